"""Sweeps (lora_jax.multi.sweep): K adapters trained in one vmapped step on one frozen base.

Oracles: each point trained alone with the single-adapter path (`lora_jax.train.loop.make_step`,
its own config, key and optimizer), and peft on PyTorch loading each saved adapter. Float32 on
CPU: losses and trained factors within 1e-5 of the lone runs, logits within 1e-4 of peft's.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import lora_jax
from lora_jax.models.loading import from_pretrained
from lora_jax.multi import sweep as sweeps
from lora_jax.train import loop as train

# Different seeds, learning rates, alphas, ranks (padded to 8) and weight decays.
POINTS = [
    {"seed": 0, "lr": 1e-2, "lora_alpha": 8, "r": 2, "weight_decay": 0.01},
    {"seed": 1, "lr": 3e-2, "lora_alpha": 16, "r": 4, "weight_decay": 0.0},
    {"seed": 2, "lr": 5e-3, "lora_alpha": 32, "r": 8, "weight_decay": 0.1},
    {"seed": 3, "lr": 2e-2, "lora_alpha": 4, "r": 4, "weight_decay": 0.01},
]
STEPS, BATCH, SEQ = 3, 2, 12
# Adam divides by sqrt(nu): a last-bit gradient difference of a near-zero gradient moves a
# factor by up to ~1e-3 x lr, so the trained factors are compared at 1e-4, the losses at 1e-5.
TOL, FACTOR_TOL, PEFT_TOL = 1e-5, 1e-4, 1e-4


def adamw(lr, weight_decay):
    return optax.adamw(lr, weight_decay=weight_decay)


def batches(per_point: bool):
    """Step i's batch: one for all points, or one per point ([K, ...])."""
    rng = np.random.RandomState(0)
    shape = (len(POINTS), BATCH, SEQ) if per_point else (BATCH, SEQ)
    out = []
    for _ in range(STEPS):
        mask = np.ones(shape, np.int32)
        mask[..., -3:] = rng.randint(0, 2, mask[..., -3:].shape)  # some padding
        out.append({"input_ids": rng.randint(0, 500, shape).astype(np.int32),
                    "attention_mask": mask})
    return out


def forward_of(apply):
    def forward(params, batch, key):
        rngs = None if key is None else {"dropout": key}
        return apply({"params": params}, batch["input_ids"], batch["attention_mask"], rngs=rngs)

    return forward


def alone(model, base, config, point, layouts, data, per_point, k):
    """Point k trained alone with the single-adapter path: (losses, trained params)."""
    config = sweeps.point_config(config, point)
    params = lora_jax.inject(base, config, jax.random.key(point["seed"]), layouts=layouts)
    trainable, frozen = lora_jax.split(params, config)
    tx = adamw(point["lr"], point["weight_decay"])
    step = train.make_step(forward_of(lora_jax.wrap(model.apply, config)), "lm", tx)
    state, losses = tx.init(trainable), []
    for i, batch in enumerate(data):
        batch = jax.tree.map(lambda x: x[k], batch) if per_point else batch
        key = jax.random.fold_in(jax.random.key(point["seed"]), i)
        trainable, state, loss = step(trainable, frozen, state, batch, key)
        losses.append(float(loss))
    return np.asarray(losses), lora_jax.combine(trainable, frozen)


def factor_leaves(params):
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(params)
            if "lora_A" in jax.tree_util.keystr(p) or "lora_B" in jax.tree_util.keystr(p)}


@pytest.mark.parametrize("arch, scan, targets, per_point", [
    pytest.param("gpt2", False, ("c_attn", "c_fc"), False, marks=pytest.mark.full),
    ("llama", True, ("q_proj", "v_proj", "down_proj"), True),
])
def test_sweep_equals_each_point_alone_and_loads_in_peft(request, tmp_path, arch, scan, targets,
                                                         per_point):
    folder = request.getfixturevalue(f"tiny_{arch}")
    model, base = from_pretrained(folder, scan_layers=scan)
    example = (jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
    layouts = lora_jax.layouts(model, *example)
    config = lora_jax.LoraConfig(target_modules=targets, lora_dropout=0.1)
    data = batches(per_point)

    sw = sweeps.sweep(base, config, POINTS, layouts=layouts)
    a = next(v for p, v in factor_leaves(sw.trainable).items() if "lora_A" in p)
    assert a.shape[0] == 4 and a.shape[-1] == 8  # K points, ranks padded to the largest
    forward = forward_of(lora_jax.wrap(model.apply, sw.config))
    step = sweeps.make_step(forward, "lm", adamw, batch_axis=0 if per_point else None)
    state, trainable, losses = sweeps.init_state(sw, adamw), sw.trainable, []
    step = step.lower(trainable, sw.scales, sw.frozen, state, data[0],
                      sweeps.dropout_keys(sw, 0)).compile()
    assert_base_once(step, sw, state, data[0])
    for i, batch in enumerate(data):
        trainable, state, loss = step(trainable, sw.scales, sw.frozen, state, batch,
                                      sweeps.dropout_keys(sw, i))
        losses.append(np.asarray(loss))
    losses = np.stack(losses, axis=1)  # [K, steps]
    trained = sweeps.unstack(sw, trainable)

    for k, point in enumerate(POINTS):
        want, want_params = alone(model, base, config, point, layouts, data, per_point, k)
        assert np.abs(losses[k] - want).max() <= TOL, (k, losses[k], want)
        params, point_config = trained[k]
        assert point_config.r == point["r"] and point_config.lora_alpha == point["lora_alpha"]
        ours, theirs = factor_leaves(params), factor_leaves(want_params)
        assert ours.keys() == theirs.keys()
        for name, value in theirs.items():  # true ranks, same trained values
            assert ours[name].shape == value.shape, name
            assert np.abs(ours[name] - value).max() <= FACTOR_TOL, (k, name)
    assert len({round(float(x), 4) for x in losses[:, -1]}) == len(POINTS)  # points differ

    # Each point saves as its own peft adapter, which peft loads: logits as our wrapped model's.
    hf_class = transformers.AutoModelForCausalLM
    ids = data[0]["input_ids"][0] if per_point else data[0]["input_ids"]
    for k, (params, point_config) in enumerate(trained):
        path = tmp_path / f"point{k}"
        lora_jax.save_peft(path, params, point_config, model_type=arch, task_type="CAUSAL_LM")
        pm = peft.PeftModel.from_pretrained(hf_class.from_pretrained(folder), path).eval()
        with torch.no_grad():
            theirs = pm(input_ids=torch.tensor(ids)).logits.numpy()
        ours = lora_jax.wrap(model.apply, point_config)({"params": params}, ids,
                                                         np.ones_like(ids))
        assert np.abs(np.asarray(ours) - theirs).max() <= PEFT_TOL, k


def assert_base_once(compiled, sw, state, batch):
    """The compiled step's arguments are the base once plus the K points, not K x the base."""
    size = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))
    base_bytes = size(sw.frozen)
    points_bytes = size((sw.trainable, sw.scales, state)) + size(batch) + 1024
    arguments = compiled.memory_analysis().argument_size_in_bytes
    assert base_bytes <= arguments <= base_bytes + points_bytes, (arguments, base_bytes)
    assert arguments < 1.5 * base_bytes  # K x base would be 4x


def dense_base():
    return nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 6)))["params"]


@pytest.mark.parametrize("points, message", [
    ([], "the sweep is empty"),
    ([{"seed": 0}, {"learning_rate": 1e-3}], "unknown sweep key 'learning_rate'"),
    ([{"target_modules": ["x"]}], "only ['seed', 'lr', 'r', 'lora_alpha', 'weight_decay'] may "
                                  "vary; run one sweep per target_modules"),
    ([{"lora_dropout": 0.1}], "run one sweep per lora_dropout"),
    ([{"lr": 1e-3}, {"seed": 1}], "sweep points [1] have no 'lr' while others do"),
])
def test_bad_sweeps(points, message):
    config = lora_jax.LoraConfig(r=2, target_modules=".*")
    with pytest.raises(ValueError) as err:
        sweeps.sweep(dense_base(), config, points)
    assert message in str(err.value)


def test_stack_refuses_points_over_other_targets_or_bases():
    base = {"a": dense_base(), "b": dense_base()}
    one = lora_jax.LoraConfig(r=2, target_modules=["a"])
    two = lora_jax.LoraConfig(r=2, target_modules=["a", "b"])
    adapters = [(lora_jax.inject(base, c, jax.random.key(0)), c) for c in (one, two)]
    with pytest.raises(ValueError, match=r"point 1 adapts other weights than point 0 "
                                         r"\(\['b.kernel'\]\).*same target_modules"):
        sweeps.stack(adapters)
    other = {"a": dense_base(), "b": jax.tree.map(lambda x: x + 1, dense_base())}
    adapters = [(lora_jax.inject(b, one, jax.random.key(0)), one) for b in (base, other)]
    with pytest.raises(ValueError, match="point 1 changes the frozen 'b.bias'.*one base"):
        sweeps.stack(adapters)


def test_cli_sweep_writes_a_run_per_point_equal_to_normal_runs(tiny_llama, tmp_path):
    from cli_run import lora_jax_cli, strict_json

    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"the match {i} ended with a late goal for the home team"
                                for i in range(40)))
    common = ["finetune", "--model", tiny_llama, "--data", text, "--steps", "4",
              "--batch-size", "4", "--seq-len", "16", "--no-progress", "--seed", "1"]
    # Different seeds: each point draws its own batches (and init, dropout).
    code, out, err = lora_jax_cli(*common, "--out", tmp_path / "sweep", "--sweep",
                                  "lr=1e-2,3e-2", "--sweep", "seed=1,2", "--r", "4")
    assert code == 0, err
    names = ["lr=0.01_seed=1", "lr=0.01_seed=2", "lr=0.03_seed=1", "lr=0.03_seed=2"]
    summary = strict_json(tmp_path / "sweep" / "summary.json")
    assert [row["point"] for row in summary["points"]] == names
    table = (tmp_path / "sweep" / "summary.md").read_text().splitlines()
    assert table[0].startswith("| point | status | final_loss | validation_perplexity")
    assert all(table[2 + i].startswith(f"| {n} | finished |") for i, n in enumerate(names))
    for name, row in zip(names, summary["points"], strict=True):
        folder = tmp_path / "sweep" / name
        metrics = strict_json(folder / "metrics.json")
        assert metrics["status"] == "finished" and len(metrics["losses"]) == 4
        assert row["final_loss"] == metrics["losses"][-1] and row["steps_per_second"] > 0
        assert row["test_perplexity"] == metrics["test"]["perplexity"] > 1
        adapter = strict_json(folder / "adapter" / "adapter_config.json")
        assert adapter["r"] == 4 and adapter["lora_alpha"] == 16
        assert strict_json(folder / "run_config.json")["seed"] == row["seed"]
    # A point equals the normal run with its flags.
    code, _, err = lora_jax_cli(*common, "--out", tmp_path / "alone", "--lr", "3e-2", "--r", "4")
    assert code == 0, err
    alone = strict_json(tmp_path / "alone" / "metrics.json")["losses"]
    swept = strict_json(tmp_path / "sweep" / "lr=0.03_seed=1" / "metrics.json")["losses"]
    assert np.abs(np.asarray(alone) - swept).max() <= TOL, (alone, swept)
    other = strict_json(tmp_path / "sweep" / "lr=0.03_seed=2" / "metrics.json")["losses"]
    assert np.abs(np.asarray(other) - swept).max() > 1e-3  # another seed: other batches


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "lr=1e-3", "--sweep", "rank=4"], "unknown key 'rank'; a sweep varies "
                                                  "['lora_alpha', 'lr', 'r', 'seed']"),
    (["--sweep", "lr"], "argument --sweep: 'lr': write KEY=V1,V2,..."),
    (["--sweep", "r=4,x"], "argument --sweep: 'r=4,x': 'x' is not a int"),
    (["--sweep", "r=4,0"], "argument --sweep: 'r=4,0': must be positive, got 0"),
    # Checked as --lr inf is, when the command line is parsed (before: a point trained on inf).
    (["--sweep", "lr=1e-3,inf"], "argument --sweep: 'lr=1e-3,inf': must be a finite number, "
                                 "got inf"),
    (["--sweep", "seed=-1"], "'seed=-1': must be in [0, 2147483647], got -1"),
    (["--sweep", "alpha=8,16"], "'alpha=8,16': the key is lora_alpha (peft's name, as in "
                                "LoraConfig): write --sweep lora_alpha=8,16"),
    (["--sweep", "lr=1e-3", "--sweep", "lr=1e-2"], "--sweep lr is given twice"),
    (["--sweep", "r=8", "--dora"], "--dora is not supported with it"),
])
def test_cli_sweep_bad_input(tmp_path, capsys, argv, message):
    from lora_jax.cli import main as cli

    code = cli.main(["finetune", "--out", str(tmp_path / "x"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()  # refused before anything was loaded or written


def test_cli_sweep_keys_are_the_point_keys_of_the_api():
    from lora_jax.cli import main as cli

    args = cli.build_parser().parse_args(["finetune", "--sweep", "lora_alpha=8,16", "--sweep",
                                          "seed=0,3"])
    assert args.sweep == [("lora_alpha", [8.0, 16.0]), ("seed", [0, 3])]
    from lora_jax.cli.sweep import KEYS, points

    assert set(KEYS) <= set(sweeps.SWEEP_KEYS)  # the names `lora_jax.multi.sweep` takes
    assert points(args.sweep)[1] == {"lora_alpha": 8.0, "seed": 3}


@pytest.mark.full
def test_dora_and_trained_biases_sweep_equal_each_point_alone():
    # Trained leaves beside the factors (DoRA magnitudes, biases) are stacked per point too.
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(5)])
    x = jax.random.normal(jax.random.key(0), (6, 12))
    batch = {"x": x, "labels": jnp.arange(6) % 5}
    base = model.init(jax.random.key(0), x)["params"]
    config = lora_jax.LoraConfig(target_modules=".*", use_dora=True, bias="all",
                                 init_lora_weights="gaussian")
    points = [{"seed": 0, "lr": 1e-2, "r": 1, "lora_alpha": 2, "weight_decay": 0.1},
              {"seed": 1, "lr": 3e-2, "r": 3, "lora_alpha": 1, "weight_decay": 0.0},
              {"seed": 2, "lr": 2e-2, "r": 2, "lora_alpha": 8, "weight_decay": 0.01}]
    sw = sweeps.sweep(base, config, points)
    assert sw.trainable["layers_0"]["bias"].shape == (3, 16)
    assert sw.trainable["layers_0"]["lora_magnitude_vector"].shape == (3, 16)
    apply = lora_jax.wrap(model.apply, sw.config)
    step = sweeps.make_step(lambda p, b, k: apply({"params": p}, b["x"]), "classify", adamw)
    state, trainable, losses = sweeps.init_state(sw, adamw), sw.trainable, []
    for i in range(STEPS):
        trainable, state, loss = step(trainable, sw.scales, sw.frozen, state, batch,
                                      sweeps.dropout_keys(sw, i))
        losses.append(np.asarray(loss))
    for k, (point, (params, _)) in enumerate(zip(points, sweeps.unstack(sw, trainable),
                                                 strict=True)):
        point_config = sweeps.point_config(config, point)
        alone_params = lora_jax.inject(base, point_config, jax.random.key(point["seed"]))
        trained, frozen = lora_jax.split(alone_params, point_config)
        trained = jax.tree.map(jnp.copy, trained)  # the step donates it: not the base's biases
        tx = adamw(point["lr"], point["weight_decay"])
        point_apply = lora_jax.wrap(model.apply, point_config)
        alone_step = train.make_step(lambda p, b, k, f=point_apply: f({"params": p}, b["x"]),
                                     "classify", tx)
        state_k, want = tx.init(trained), []
        for _ in range(STEPS):
            trained, state_k, loss = alone_step(trained, frozen, state_k, batch, None)
            want.append(float(loss))
        assert np.abs(np.asarray(losses)[:, k] - want).max() <= TOL, k
        got = jax.tree.leaves(params)
        for a, b in zip(got, jax.tree.leaves(lora_jax.combine(trained, frozen)), strict=True):
            assert a.shape == b.shape and np.abs(np.asarray(a) - b).max() <= FACTOR_TOL
