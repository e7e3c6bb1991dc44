"""`lora-jax` command line: error handling, an end-to-end finetune, Ctrl-C and --resume."""

import json
import subprocess
import sys

import pytest

from lora_jax import cli


def run_main(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--bogus"], "unrecognized arguments: --bogus"),
    (["finetune", "--method", "qlora"], "invalid choice: 'qlora'"),
    (["finetune", "--r", "0"], "must be positive"),
    (["finetune", "--steps", "3", "--epochs", "1"], "not allowed with argument"),
    (["finetune", "--data", "/no/such/file.jsonl"], "no such file"),
    (["finetune", "--model", "bert-huge"], "unknown model 'bert-huge'"),
    (["finetune", "--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["finetune", "--resume", "/no/such/run"], "not a lora-jax run folder"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run_main(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_one_class_dataset_is_rejected(capsys, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": "a"}) for i in range(5)))
    code, _, err = run_main(capsys, "finetune", "--data", str(path))
    assert code == 2 and "only one class ('a')" in err and len(err.strip().splitlines()) == 1


def test_model_folder_without_config_is_rejected(capsys, tmp_path):
    code, _, err = run_main(capsys, "finetune", "--model", str(tmp_path))
    assert code == 2 and "neither an HF model folder" in err


def test_console_entry_point_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "lora_jax", "finetune", "--model", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("lora-jax: error: unknown model 'nope': use minilm, smollm2, "
                                   "an HF model folder or a .gguf file")


# --- the training loop on a tiny stand-in (no model files needed) --------------------------------

def _tiny_setup():
    import flax.linen as nn
    import jax
    import numpy as np
    import optax

    import lora_jax

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, ids, mask):
            x = nn.Embed(32, 16, name="embed")(ids)
            x = nn.Dense(16, name="query")(x) * mask[..., None]
            return nn.Dense(3, name="classifier")(x.mean(1))

    model = Tiny()
    rng = np.random.default_rng(0)
    arrays = {"input_ids": rng.integers(0, 32, (40, 6)).astype(np.int32),
              "attention_mask": np.ones((40, 6), np.int32)}
    arrays["labels"] = (arrays["input_ids"][:, 0] % 3).astype(np.int32)
    config = lora_jax.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["query"],
                                 modules_to_save=["classifier"])
    params = lora_jax.inject(model.init(jax.random.key(0), arrays["input_ids"][:1],
                                        arrays["attention_mask"][:1])["params"],
                             config, jax.random.key(1))
    apply = lora_jax.wrap(model.apply, config)

    def forward(p, batch, key):
        return apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                     rngs=None if key is None else {"dropout": key})

    tx = lora_jax.optimizer(optax.adam(3e-2), params, config)
    return forward, tx, params, config, arrays


def test_fit_resumed_from_a_checkpoint_repeats_the_uninterrupted_losses(tmp_path):
    import jax
    import jax.numpy as jnp

    import lora_jax
    from lora_jax import train
    from lora_jax.checkpoint import AdapterCheckpointer

    forward, tx, params, config, arrays = _tiny_setup()
    trainable, frozen = lora_jax.split(params, config)
    kw = dict(steps=12, batch_size=8, seed=3, config=config, progress=False)
    fresh = lambda: jax.tree.map(jnp.copy, trainable)  # fit donates what it is given
    whole = train.fit(forward, "classify", tx, fresh(), frozen, arrays, **kw)
    assert whole.losses[-1] < 0.85 * whole.losses[0]  # it learns (dropout on, 12 steps)

    with AdapterCheckpointer(tmp_path / "ckpt") as ckpt:
        train.fit(forward, "classify", tx, fresh(), frozen, arrays, **{**kw, "steps": 5},
                  checkpointer=ckpt)
        target = (trainable, tx.init(trainable))
        step, restored, opt_state, _ = ckpt.restore(target=target)
    assert step == 5
    resumed = train.fit(forward, "classify", tx, restored, frozen, arrays, **kw,
                        opt_state=opt_state, start_step=5, losses=whole.losses[:5])
    assert resumed.losses == whole.losses  # exact on CPU: same batches, keys and programs
    evaluation = train.evaluate(forward, "classify", lora_jax.combine(resumed.trainable, frozen),
                                arrays, batch_size=16)  # 40 = 16 + 16 + 8 (padded)
    assert evaluation["examples"] == 40 and 0.0 <= evaluation["accuracy"] <= 1.0
