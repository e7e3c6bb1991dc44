"""One LoraConfig on one tiny model, run through peft and lora_jax, compared on everything peft
interop promises: validity (both raise or both accept), the adapted modules with their r and
scaling, the number of trainable parameters, the logits, merge, export (save_peft ->
PeftModel.from_pretrained) and import (peft save_pretrained -> load_peft).

`compare(arch, fields, scan, tmp)` returns a `Result` with a list of disagreements (empty when
the two agree). Used by tests/test_peft_parity.py (one named test per class of past
disagreement) and tests/test_peft_differential.py (hypothesis over peft's field space).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import logging
import os
import warnings
from typing import Any

import jax
import numpy as np
import peft
import torch
import transformers
from decoder_families import FAMILIES, SLIDE, tiny
from peft_checks import max_diff, state_dict, tiny_hf, torch_out

import lora_jax
from lora_jax.models import bert, bloom, decoder, gpt2, llama, t5
from lora_jax.peft import files as peft_io

TOL = 1e-4  # logits, float32
MERGE_TOL = 1e-5
IDS = np.random.RandomState(1).randint(0, 99, (2, 8))
MASK = np.array([[1] * 8, [1] * 5 + [0] * 3])


def gpt2_hf() -> Any:
    return tiny_hf(transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=99, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
        bos_token_id=0, eos_token_id=0))


def bert_hf() -> Any:
    return tiny_hf(transformers.BertForSequenceClassification, transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=3, initializer_range=0.2))


def llama_hf(tied: bool = False) -> Any:
    return tiny_hf(transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        initializer_range=0.2, tie_word_embeddings=tied))


def bloom_hf() -> Any:
    return tiny_hf(transformers.BloomForCausalLM, transformers.BloomConfig(
        vocab_size=99, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.2))


def t5_hf(gated: bool = True) -> Any:
    return tiny_hf(transformers.T5ForConditionalGeneration, transformers.T5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=0,
        feed_forward_proj="gated-gelu" if gated else "relu"))


@dataclasses.dataclass(frozen=True)
class Arch:
    module: Any
    hf: Any
    inputs: dict[str, np.ndarray]
    task: dict[str, str]
    # Names that exist in the model, for generating configs.
    linear: tuple[str, ...]
    other: tuple[str, ...]  # embeddings, heads, norms: targets or modules_to_save
    layers_pattern: str
    paths: tuple[str, ...] = ()  # dotted suffixes and full per-layer module paths
    regexes: tuple[str, ...] = ()


ARCHS = {
    "gpt2": Arch(gpt2, gpt2_hf, {"input_ids": IDS}, {},
                 ("c_attn", "c_proj", "c_fc"), ("wte", "wpe", "ln_f", "ln_1", "attn"), "h",
                 ("attn.c_attn", "mlp.c_proj", "transformer.h.0.attn.c_attn",
                  "transformer.h.1.mlp.c_fc", "h.1.attn.c_proj"),
                 (r".*\.c_attn", r".*h\.1\..*c_.*", r"transformer\.h\.\d+\.mlp\.c_fc",
                  r".*(attn|mlp)\.c_proj", r".*\.attn.*")),
    "bert": Arch(bert, bert_hf, {"input_ids": IDS, "attention_mask": MASK},
                 {"task": "classify"}, ("query", "key", "value", "dense", "classifier"),
                 ("word_embeddings", "pooler", "LayerNorm", "classifier", "output"), "layer",
                 ("attention.self.query", "output.dense", "bert.encoder.layer.0.attention.self.key",
                  "bert.encoder.layer.1.intermediate.dense", "pooler.dense"),
                 (r".*\.(query|value)", r".*layer\.1\..*dense", r".*attention\.output\.dense",
                  r"bert\.encoder\.layer\.0\..*")),
    "llama": Arch(llama, llama_hf, {"input_ids": IDS},
                  {}, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj", "lm_head"), ("embed_tokens", "lm_head", "norm", "mlp"),
                  "layers",
                  ("self_attn.q_proj", "mlp.down_proj", "model.layers.0.self_attn.v_proj",
                   "model.layers.1.mlp.gate_proj", "layers.1.self_attn.o_proj"),
                  (r".*\.(q|v)_proj", r"model\.layers\.1\.self_attn\.(q|v)_proj",
                   r".*mlp\.(gate|up)_proj", r".*layers\.0\..*_proj",
                   r"model\.layers\.\d+\..*")),
    "bloom": Arch(bloom, bloom_hf, {"input_ids": IDS, "attention_mask": np.ones_like(MASK)},
                  {}, ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
                  ("word_embeddings", "ln_f", "word_embeddings_layernorm"), "h",
                  ("self_attention.query_key_value", "mlp.dense_4h_to_h",
                   "transformer.h.0.self_attention.dense", "transformer.h.1.mlp.dense_h_to_4h"),
                  (r".*query_key_value", r".*h\.0\..*dense.*", r".*mlp\.dense_.*")),
    "t5": Arch(t5, t5_hf, {"input_ids": IDS, "decoder_input_ids": IDS[:, :5]}, {},
               ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),  # lm_head: tied to `shared`
               ("shared", "relative_attention_bias", "final_layer_norm", "layer_norm"), "block",
               ("SelfAttention.q", "EncDecAttention.v", "DenseReluDense.wi_0",
                "encoder.block.0.layer.0.SelfAttention.k",
                "decoder.block.1.layer.2.DenseReluDense.wo",
                "encoder.block.1.layer.1.DenseReluDense.wi_1"),
               (r".*SelfAttention\.(q|v)", r"encoder\..*\.(q|k)", r".*block\.1\..*wi_\d",
                r"decoder\.block\.0\..*", r".*\.wo")),
}


def family_hf(name: str, **overrides: Any) -> Any:
    """A decoder family's tiny model (tests/decoder_families.py) with 2 layers, as the others."""
    two = {"layer_types": SLIDE[:2]} if name == "gemma3_text" else {}
    return tiny(name, **{"num_hidden_layers": 2, **two, **overrides})


def decoder_arch(name: str) -> Arch:
    """The names of one decoder family (lora_jax.models.decoder), from its switches: Phi-3's
    fused qkv_proj / gate_up_proj; the MoE families' router `gate` (a target: peft takes it as
    the router's weight parameter) and fused `experts` (parameters, not modules: saved, not
    targeted); Gemma's head tied to embed_tokens (no lm_head module in lora_jax's params)."""
    config = decoder.config_from_hf(family_hf(name).config.to_dict())
    attn = ("qkv_proj",) if config.fused_qkv else ("q_proj", "k_proj", "v_proj")
    mlp = (("gate",) if config.num_experts else
           ("gate_up_proj", "down_proj") if config.fused_gate_up else
           ("gate_proj", "up_proj", "down_proj"))
    head = () if config.tie_word_embeddings else ("lm_head",)
    norms = ("q_norm",) if config.qk_norm else ()
    saved = ("mlp.experts",) if config.num_experts else ("mlp",)
    q, up, down = attn[0], mlp[0], mlp[-1]
    mlp_any = "|".join(dict.fromkeys((up, down)))  # the MoE router once
    return Arch(decoder, functools.partial(family_hf, name), {"input_ids": IDS}, {},
                attn + ("o_proj",) + mlp + head,
                ("embed_tokens", *head, "norm", *norms, *saved), "layers",
                (f"self_attn.{q}", f"mlp.{down}", f"model.layers.0.self_attn.{attn[-1]}",
                 f"model.layers.1.mlp.{up}", "layers.1.self_attn.o_proj"),
                (rf".*\.{q}", rf"model\.layers\.1\.self_attn\.({attn[-1]}|o_proj)",
                 rf".*mlp\.({mlp_any})", r".*layers\.0\..*_proj", r"model\.layers\.\d+\..*"))


# Llama keeps its own arch above (untied, no biases; test_peft_parity builds it tied).
ARCHS.update({name: decoder_arch(name) for name in FAMILIES if name != "llama"})


@dataclasses.dataclass
class Result:
    disagreements: list[str] = dataclasses.field(default_factory=list)
    peft_error: str | None = None
    ours_error: str | None = None
    peft_targets: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)
    our_targets: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)
    checks: dict[str, float] = dataclasses.field(default_factory=dict)
    quirk: bool = False
    peft_converted: bool = False  # peft rewrote the targets for transformers 5's MoE layers
    nested_saved: bool = False  # peft wrapped a module to save inside another one

    def fail(self, what: str) -> None:
        self.disagreements.append(what)


def _full_name_quirk(fields: dict[str, Any], only_peft: set[str]) -> bool:
    """Whether peft adapts `only_peft` only because they are named in full (class 13)."""
    targets, wanted = fields.get("target_modules"), fields.get("layers_to_transform")
    return bool(only_peft) and isinstance(targets, list) and bool(wanted) and all(
        p in targets for p in only_peft)


def _converted(fields: dict[str, Any], config: Any) -> bool:
    """Whether peft rewrote `fields`' targets in `config` (get_peft_model changes it in place)
    for transformers 5's MoE layers: transformers-4 router / expert names made
    target_parameters, a regex made the leaf names it matched (peft's
    convert_peft_config_for_transformers, Qwen3-MoE and Mixtral)."""
    given = fields.get("target_modules")
    added = set(config.target_parameters or ()) - set(fields.get("target_parameters") or ())
    return bool(added) or (isinstance(given, str) and given != "all-linear"
                           and not isinstance(config.target_modules, str))


def _nested_saved(model: Any) -> bool:
    """Whether peft put a modules_to_save wrapper inside another (entries that nest, e.g. BERT's
    "output" and "LayerNorm"): peft's files for that are not well defined."""
    from peft.utils.other import ModulesToSaveWrapper

    names = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    return any(a != b and b.startswith(a + ".") for a in names for b in names)


def peft_targets(model: Any) -> dict[str, tuple[int, float]]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.r:
            name = name.removeprefix("base_model.model.")
            out[name] = (module.r["default"], float(module.scaling["default"]))
    return out


def our_targets(params: Any, stacks: Any) -> dict[str, tuple[int, float]]:
    out = {}
    for torch_path, slot in peft_io._index(params, stacks, None).items():
        record = peft_io._record(slot.node, slot.flax_path)
        if record is None:
            continue
        if slot.layer is not None and record.layers is not None and \
                slot.layer not in record.layers:
            continue
        out[torch_path] = peft_io._slot_values(record, slot)
    return out


@contextlib.contextmanager
def quiet():
    logging.disable(logging.WARNING)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _float64(peft_model: Any) -> Any:
    """A float64 copy of `peft_model`; an MoE model's experts run eagerly (transformers'
    default grouped_mm takes no float64)."""
    model = copy.deepcopy(peft_model).double()
    base = model.get_base_model()
    if getattr(base.config, "_experts_implementation", None) not in (None, "eager"):
        base.set_experts_implementation("eager")
    return model


def _perturb_torch(model: Any, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))


def _perturb_jax(params: Any, config: lora_jax.LoraConfig, seed: int) -> Any:
    trainable, frozen = lora_jax.split(params, config)
    leaves, treedef = jax.tree.flatten(trainable)
    rng = np.random.RandomState(seed)
    leaves = [x + 0.3 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
    trainable = jax.tree.unflatten(treedef, leaves)
    params = lora_jax.combine(trainable, frozen)
    # Layers a scanned stack leaves out keep zero factors.
    return _zero_unselected(params)


def _zero_unselected(params: Any) -> Any:
    """Zero where training keeps zeros: the layers a stack leaves out, and the columns of A /
    rows of B beyond a layer's own rank in a stack with per-layer ranks."""
    from lora_jax import variants
    from lora_jax.core.record import iter_records
    from lora_jax.core.targets import with_leaves

    fixes = {}
    for item in iter_records(params):
        record = item.record
        if record.layers is None and record.ranks is None:
            continue
        n = item.weight.shape[0]
        ranks = np.array(record.ranks or [record.rank] * n)
        if record.layers is not None:
            ranks[[i for i in range(n) if i not in record.layers]] = 0
        keep = np.arange(record.rank)[None, :] < ranks[:, None]  # [L, r]
        fixes[item.path] = {}
        for leaf in variants.of(record).leaves:
            value = item.leaves[leaf.name]
            shape = [n] + [1] * (value.ndim - 1)
            if "r" in leaf.axes:  # the columns / rows beyond a layer's rank
                shape[leaf.rank_axis(1)] = record.rank
                mask = keep
            else:  # a layer left out
                mask = ranks > 0
            fixes[item.path][record.keys[leaf.name]] = value * mask.reshape(shape)
    return with_leaves(params, fixes) if fixes else params


def _logits(model: Any, params: Any, config: Any, arch: Arch) -> np.ndarray:
    return np.asarray(lora_jax.wrap(model.apply, config)({"params": params}, **arch.inputs))


def _close(a: np.ndarray, b: np.ndarray, arch: Arch) -> float:
    """Max abs diff (unpadded positions), relative to the logits' size once they exceed 1."""
    if "attention_mask" in arch.inputs and a.ndim == 3:
        keep = arch.inputs["attention_mask"] == 1
        a, b = a[keep], b[keep]
    return max_diff(a, b) / max(1.0, float(np.abs(b).max()))


def _jitter(model: Any, params: Any, config: Any, arch: Arch, draws: int = 3) -> float:
    """How far our float32 logits move when every float32 param is rounded differently (times
    1 + 6e-8 noise, float32's unit roundoff): the float32 conditioning of this config on its
    own, where peft in float64 is no exact judge (HF's RMSNorm and rotary compute in float32
    even in a float64 model). Measured on Qwen2 all-linear, r=1, alpha=16 (scale 16): 2.9e-4 to
    2.3e-3 (test_peft_parity.py::test_qwen2_float32_conditioning_judged_by_jitter)."""
    ours = _logits(model, params, config, arch)
    rng = np.random.RandomState(0)
    noise = lambda x: (x * (1 + 6e-8 * rng.standard_normal(x.shape))).astype(x.dtype) if \
        getattr(x, "dtype", None) == np.float32 else x
    return max(_close(_logits(model, jax.tree.map(noise, params), config, arch), ours, arch)
               for _ in range(draws))


def _logits_diff(res: Result, what: str, ours: np.ndarray, peft_model: Any, arch: Arch,
                 reload: Any = None, jitter: Any = None) -> None:
    """Compare our float32 logits with the peft model's; record `<what>_logits` and fail above
    TOL. When float32 disagrees, peft in float64 is the judge (`<what>_logits_float64`): T5's
    attention has no 1/sqrt(d) scaling, so perturbed factors give scores in the hundreds or
    thousands and the softmax multiplies float32 rounding by about that much. Measured on T5
    all-linear + rsLoRA (r=8, alpha=16): peft float32 vs peft float64 4.5e-4, lora_jax float32
    vs peft float64 1.7e-5 (test_peft_parity.py::test_t5_float32_rounding_judged_by_float64)."""
    with quiet():
        theirs = torch_out(peft_model, arch.inputs)
    d = _close(ours, theirs, arch)
    res.checks[f"{what}_logits"] = d
    if d <= TOL:
        return
    with quiet():
        exact = torch_out(_float64(peft_model), arch.inputs)
    d64 = _close(ours, exact, arch)
    res.checks[f"{what}_logits_float64"] = d64
    # How far float32 itself is from the exact logits here (peft's own float32 error): with q
    # and k adapted at scale 8, T5's scores reach thousands and both float32 computations are
    # ~1e-3 off (peft 9.7e-4, lora_jax 2.0e-3 on r=2, alpha=16, ["q", "k", ...wo]).
    conditioning = _close(theirs, exact, arch)
    res.checks[f"{what}_logits_float32_error"] = conditioning
    # Against the exact logits our float32 may be off by more than TOL where peft's float32
    # happens to be close: the full tier's 200 T5 configs had two at 1.12e-4 and 1.30e-4
    # (peft's float32 error 2.8e-5 or less there), so the float64 judge allows 2 * TOL.
    if d64 <= max(2 * TOL, 4 * conditioning):
        return
    if jitter is not None:
        # Our own float32 conditioning: the 200 Qwen2 configs had one at 1.0e-3 (float64 peft
        # 8.5e-4, peft's float32 error 1.7e-4) that params rounded differently move by 2.3e-3.
        res.checks[f"{what}_logits_float32_jitter"] = spread = jitter()
        if d64 <= 4 * spread:
            return
    if reload is not None:
        # peft picks the first matching rank/alpha_pattern key in dict order but saves the
        # patterns with sorted keys: two keys matching one module give its in-memory model one
        # scale and its own reload of the file another. The file is what load_peft reads.
        with quiet():
            try:
                d_file = _close(ours, torch_out(reload(), arch.inputs), arch)
            except Exception:  # noqa: BLE001 - peft cannot read its own file (nested wrappers)
                d_file = float("inf")
        res.checks[f"{what}_logits_peft_reload"] = d_file
        if d_file <= TOL:
            return
    res.fail(f"{what} logits: max diff {d:.2e} (float64 peft: {d64:.2e})")


def compare(name: str, fields: dict[str, Any], scan: bool, tmp: str, *, seed: int = 0,
            hf_kwargs: dict[str, Any] | None = None, io: bool = True) -> Result:
    """Run `fields` (peft LoraConfig kwargs) through both libraries on the tiny `name` model."""
    arch = ARCHS[name]
    res = Result()
    make_hf = (lambda: arch.hf(**hf_kwargs)) if hf_kwargs else arch.hf
    hf = make_hf()
    config_hf = arch.module.config_from_hf(hf.config.to_dict())
    model = arch.module.build(config_hf, scan_layers=scan, **arch.task)
    base = arch.module.params_from_hf(state_dict(hf), config_hf, scan_layers=scan, **arch.task)
    stacks = arch.module.LAYER_STACKS
    # peft
    peft_config = None
    with quiet():
        try:
            peft_config = peft.LoraConfig(**copy.deepcopy(fields))
            pm = peft.get_peft_model(hf, peft_config)
        except Exception as e:  # noqa: BLE001 - any refusal counts as invalid
            pm, res.peft_error = None, f"{type(e).__name__}: {e}"
    res.peft_converted = peft_config is not None and _converted(fields, peft_config)
    # lora_jax
    with quiet():
        try:
            config = lora_jax.LoraConfig(**fields)
            layouts = lora_jax.layouts(model, **arch.inputs)
            params = lora_jax.inject(base, config, jax.random.key(seed), layouts=layouts)
        except (ValueError, TypeError) as e:
            params, res.ours_error = None, f"{type(e).__name__}: {e}"
    if pm is not None and params is None:
        res.peft_targets = peft_targets(pm)
        res.quirk = _full_name_quirk(fields, set(res.peft_targets))
    if (pm is None) != (params is None):
        res.fail(f"validity: peft {res.peft_error or 'accepts'}; lora_jax "
                 f"{res.ours_error or 'accepts'}")
        return res
    if pm is None:
        return res
    res.nested_saved = _nested_saved(pm)
    res.peft_targets, res.our_targets = peft_targets(pm), our_targets(params, stacks)
    res.quirk = _full_name_quirk(fields, res.peft_targets.keys() - res.our_targets.keys())
    if res.quirk and not res.our_targets.keys() - res.peft_targets.keys():
        pass  # class 13: peft's code lets full names skip layers_to_transform; lora_jax doesn't
    elif res.peft_targets.keys() != res.our_targets.keys():
        res.fail(f"targets: only peft {sorted(res.peft_targets.keys() - res.our_targets.keys())}"
                 f", only lora_jax {sorted(res.our_targets.keys() - res.peft_targets.keys())}")
        return res
    for path, (r, s) in res.peft_targets.items():
        if path not in res.our_targets:
            continue
        r2, s2 = res.our_targets[path]
        if r != r2 or abs(s - s2) > 1e-6 * abs(s):
            res.fail(f"ranks: {path} peft (r={r}, scale={s}) lora_jax (r={r2}, scale={s2})")
    if res.disagreements:
        return res
    # trainable parameter counts (peft counts saved modules' frozen originals in the total)
    ours_trainable, _ = lora_jax.count_parameters(params, config)
    theirs_trainable, _ = pm.get_nb_trainable_parameters()
    if ours_trainable != theirs_trainable and not res.quirk:
        res.fail(f"count: peft {theirs_trainable} trainable, lora_jax {ours_trainable}")
    if not io:
        return res
    model_type = name
    # import: peft's adapter, perturbed, saved, loaded by load_peft
    with quiet():
        _perturb_torch(pm, seed)
        pm.eval()
        pm.save_pretrained(os.path.join(tmp, "peft"))
        try:
            loaded, loaded_config = lora_jax.load_peft(os.path.join(tmp, "peft"), base,
                                                       model_type=model_type, layouts=layouts)
        except ValueError as e:
            loaded = None
            try:  # a file peft itself cannot load back is peft's bug, not an import failure
                peft.PeftModel.from_pretrained(make_hf(), os.path.join(tmp, "peft"))
                res.fail(f"import: load_peft raised {e}")
            except Exception:  # noqa: BLE001
                res.checks["import_unreadable_by_peft"] = 1.0
    if loaded is not None:
        _logits_diff(res, "import", _logits(model, loaded, loaded_config, arch), pm, arch,
                     reload=lambda: peft.PeftModel.from_pretrained(
                         make_hf(), os.path.join(tmp, "peft")).eval(),
                     jitter=lambda: _jitter(model, loaded, loaded_config, arch))
    # export: our adapter, perturbed, saved by save_peft, loaded by PeftModel.from_pretrained
    ours = _perturb_jax(params, config, seed + 1)
    path = os.path.join(tmp, "ours")
    with quiet():
        try:
            lora_jax.save_peft(path, ours, config, model_type=model_type)
            pm2 = peft.PeftModel.from_pretrained(make_hf(), path).eval()
        except Exception as e:  # noqa: BLE001
            res.fail(f"export: {type(e).__name__}: {e}")
            return res
        exported = peft_targets(pm2)
    if exported != res.our_targets:
        res.fail(f"export targets: peft loads {sorted(exported)} for {sorted(res.our_targets)}")
    _logits_diff(res, "export", _logits(model, ours, config, arch), pm2, arch,
                 jitter=lambda: _jitter(model, ours, config, arch))
    # merge
    with quiet():
        merged_ref = arch.module.params_from_hf(state_dict(pm2.merge_and_unload()), config_hf,
                                                scan_layers=scan, **arch.task)
    merged = lora_jax.merge(ours, config)
    d = max(jax.tree.leaves(jax.tree.map(max_diff, merged, merged_ref)))
    res.checks["merge"] = d
    if d > MERGE_TOL:
        res.fail(f"merge: max diff {d:.2e}")
    return res
