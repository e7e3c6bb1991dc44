"""Adapter checkpoints: what is written, retention, restore onto other meshes, kill mid-save,
and a resumed run reproducing the uninterrupted losses."""

import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax
from lora_jax.core.checkpoint import AdapterCheckpointer

CONFIG = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], bias="lora_only")
REPO = pathlib.Path(__file__).resolve().parents[1]


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(256, name="up")(x))
        return nn.Dense(16, name="down")(x)


def setup(seed=0):
    model, x = MLP(), jax.random.normal(jax.random.key(seed + 1), (32, 16))
    params = lora_jax.inject(model.init(jax.random.key(seed), x)["params"], CONFIG,
                             jax.random.key(seed + 2))
    tx = lora_jax.optimizer(optax.adam(1e-2), params, CONFIG)
    apply = lora_jax.wrap(model.apply, CONFIG)

    @jax.jit
    def step(trainable, frozen, opt_state, x):
        def loss_fn(trainable):
            y = apply({"params": lora_jax.combine(trainable, frozen)}, x)
            return jnp.mean((y - jnp.sin(x)) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        params = lora_jax.combine(trainable, frozen)
        updates, opt_state = tx.update(lora_jax.combine(grads, jax.tree.map(
            jnp.zeros_like, frozen)), opt_state, params)
        trainable, _ = lora_jax.split(optax.apply_updates(params, updates), CONFIG)
        return trainable, opt_state, loss

    trainable, frozen = lora_jax.split(params, CONFIG)
    return trainable, frozen, tx.init(params), step, x


def dir_bytes(path):
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_save_every_retention_and_no_base_written(tmp_path):
    trainable, frozen, opt_state, step, x = setup()
    with AdapterCheckpointer(tmp_path, save_every=2, max_to_keep=2) as ckpt:
        started = [ckpt.save(s, trainable, opt_state, CONFIG) for s in range(1, 8)]
        assert started == [False, True, False, True, False, True, False]
        assert ckpt.save(7, trainable, opt_state, CONFIG, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7
        assert ckpt.config() == CONFIG
    # Only the adapter: the frozen kernels (2 x 16 KiB) are not on disk. The step directory
    # holds the trainable leaves and Adam's two moments, plus orbax metadata.
    written = dir_bytes(tmp_path / "7")
    assert nbytes(frozen) > 3 * nbytes(trainable)
    assert written < 3 * nbytes(trainable) + 24_000, (written, nbytes(trainable))
    assert written < nbytes(frozen)


def test_vera_and_lokr_configs_come_back_as_saved(tmp_path):
    """The checkpoint keeps its config's class (the variant's), not only its fields."""
    trainable, _, opt_state, _, _ = setup()
    configs = [lora_jax.VeraConfig(r=4, target_modules=["up"], d_initial=0.3),
               lora_jax.LoKrConfig(r=2, alpha=3, target_modules=["up"], decompose_both=True)]
    with AdapterCheckpointer(tmp_path) as ckpt:
        for step, config in enumerate(configs, 1):
            ckpt.save(step, trainable, opt_state, config, force=True)
        ckpt.wait()
        assert [ckpt.config(step) for step in (1, 2)] == configs


def test_restore_onto_8_4_1_devices(tmp_path):
    trainable, frozen, opt_state, step, x = setup()
    mesh8 = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tp"))
    # A of `up` [16, 4] sharded on its input axis, B of `up` [4, 256] on its output axis.
    specs = {"up": {"lora_A": P("fsdp", None), "lora_B": P(None, "tp")}}

    def place(tree, mesh):
        def leaf(path, v):
            keys = [k.key for k in path]
            spec = specs.get(keys[-2], {}).get(keys[-1], P()) if len(keys) >= 2 else P()
            return jax.device_put(v, NamedSharding(mesh, spec))
        return jax.tree_util.tree_map_with_path(leaf, tree)

    for _ in range(3):
        trainable, opt_state, _ = step(trainable, frozen, opt_state, x)
    trainable8 = place(trainable, mesh8)
    with AdapterCheckpointer(tmp_path) as ckpt:
        ckpt.save(3, trainable8, opt_state, CONFIG)

    for devices, shape in ((8, (4, 2)), (4, (2, 2)), (1, (1, 1))):
        mesh = Mesh(np.array(jax.devices()[:devices]).reshape(shape), ("fsdp", "tp"))
        target_t = place(jax.tree.map(jnp.zeros_like, trainable), mesh)
        target_o = jax.tree.map(lambda a, mesh=mesh: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=NamedSharding(mesh, P())), opt_state)
        with AdapterCheckpointer(tmp_path) as ckpt:
            got_step, got_t, got_o, got_config = ckpt.restore(target=(target_t, target_o))
        assert got_step == 3 and got_config == CONFIG
        for want, got, tgt in zip(jax.tree.leaves(trainable), jax.tree.leaves(got_t),
                                  jax.tree.leaves(target_t), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            assert got.sharding == tgt.sharding
        a = got_t["up"]["lora_A"]
        assert a.sharding.spec == P("fsdp", None) and len(a.sharding.device_set) == devices
        assert {s.data.shape for s in a.addressable_shards} == {(16 // shape[0], 4)}
        assert type(got_o) is type(opt_state)  # optax namedtuples come back, not dicts
        for want, got in zip(jax.tree.leaves(opt_state), jax.tree.leaves(got_o), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            assert len(got.sharding.device_set) == devices


def test_restore_errors(tmp_path):
    trainable, _, opt_state, _, _ = setup()
    with AdapterCheckpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="no complete adapter checkpoint"):
            ckpt.restore(target=(trainable, opt_state))
        ckpt.save(1, trainable, opt_state, CONFIG)
        ckpt.wait()
        with pytest.raises(FileNotFoundError, match=r"step 5 .* steps: \[1\]"):
            ckpt.restore(5, target=(trainable, opt_state))
        with pytest.raises(ValueError, match="needs a sharding"):
            ckpt.restore(target=(jax.tree.map(lambda a: np.asarray(a), trainable), opt_state))
    with pytest.raises(ValueError, match="save_every"):
        AdapterCheckpointer(tmp_path, save_every=0)


KILLED_SAVER = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from test_checkpoint import CONFIG, setup
    from lora_jax.core.checkpoint import AdapterCheckpointer
    trainable, frozen, opt_state, step, x = setup()
    ckpt = AdapterCheckpointer({directory!r})
    ckpt.save(1, trainable, opt_state, CONFIG)
    ckpt.wait()
    # Step 2 is large (64 MiB) so that its write is still running when the parent kills us.
    big = dict(trainable, extra=jnp.ones((16, 1024, 1024)))
    ckpt.save(2, big, opt_state, CONFIG)
    print("SAVING", flush=True)
    time.sleep(60)
""")


def test_killed_during_save_leaves_last_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    code = KILLED_SAVER.format(repo=str(REPO), tests=str(REPO / "tests"),
                               directory=str(directory))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "SAVING"
        child.kill()  # SIGKILL: no cleanup, no atexit
        child.wait(timeout=30)
    finally:
        child.kill()
    leftovers = [p.name for p in directory.iterdir() if p.name.startswith("2")]
    assert leftovers and all("tmp" in name for name in leftovers), leftovers  # killed mid-save
    trainable, _, opt_state, _, _ = setup()
    with AdapterCheckpointer(directory) as ckpt:
        assert ckpt.all_steps() == [1]
        got_step, got_t, _, got_config = ckpt.restore(target=(trainable, opt_state))
    assert got_step == 1 and got_config == CONFIG
    for want, got in zip(jax.tree.leaves(trainable), jax.tree.leaves(got_t), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    trainable, frozen, opt_state, step, x = setup()
    target = (trainable, opt_state)
    batch = lambda s: jax.random.normal(jax.random.fold_in(jax.random.key(9), s), x.shape)
    losses = []
    with AdapterCheckpointer(tmp_path, save_every=3) as ckpt:
        for s in range(1, 9):
            trainable, opt_state, loss = step(trainable, frozen, opt_state, batch(s))
            losses.append(float(loss))
            ckpt.save(s, trainable, opt_state, CONFIG)
    # A fresh process would start here: restore the latest (step 6) and run steps 7 and 8.
    with AdapterCheckpointer(tmp_path, save_every=3) as ckpt:
        start, trainable, opt_state, _ = ckpt.restore(target=target)
    assert start == 6
    resumed = []
    for s in range(start + 1, 9):
        trainable, opt_state, loss = step(trainable, frozen, opt_state, batch(s))
        resumed.append(float(loss))
    assert losses[0] > 1.2 * losses[5]  # it trains
    np.testing.assert_array_equal(resumed, losses[6:])  # same computation: bit-identical


def _two_steps(directory):
    trainable, frozen, opt_state, step, x = setup()
    with AdapterCheckpointer(directory) as ckpt:
        ckpt.save(1, trainable, opt_state, CONFIG, extra={"losses": [1.5]})
        trainable, opt_state, _ = step(trainable, frozen, opt_state, x)
        ckpt.save(2, trainable, opt_state, CONFIG, extra={"losses": [1.5, 1.25]})
    return setup()[0], setup()[2]  # a fresh target


@pytest.mark.parametrize("damage", ["flip_data_byte", "delete_data", "garbage_meta"])
def test_a_damaged_step_is_an_error_and_restore_intact_falls_back(tmp_path, damage):
    from lora_jax.core.checkpoint import CorruptCheckpoint

    trainable, opt_state = _two_steps(tmp_path)
    step2 = tmp_path / "2"
    data_files = sorted((p for p in (step2 / "trainable").rglob("*")
                         if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    if damage == "flip_data_byte":  # one bit of the stored arrays, as a bad disk would
        for file in data_files:
            raw = bytearray(file.read_bytes())
            raw[len(raw) // 2] ^= 0x01
            file.write_bytes(bytes(raw))
    elif damage == "delete_data":
        for file in data_files:
            file.unlink()
    else:
        (step2 / "meta" / "metadata").write_text("{not json")
    with AdapterCheckpointer(tmp_path) as ckpt:
        with pytest.raises(CorruptCheckpoint, match=f"checkpoint {step2}"):
            ckpt.restore(2, target=(trainable, opt_state))
        restored, skipped = ckpt.restore_intact(target=(trainable, opt_state))
        assert restored.step == 1 and [s for s, _ in skipped] == [2]
        assert ckpt.extra(1) == {"losses": [1.5]}
        assert ckpt.all_steps() == [1]  # step 2 set aside, so step 2 can be saved again
    assert (tmp_path.parent / (tmp_path.name + ".unreadable") / "2").is_dir()
    for want, got in zip(jax.tree.leaves(setup()[0]), jax.tree.leaves(restored.trainable),
                         strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_no_intact_step_is_an_error_and_extra_must_be_finite(tmp_path):
    from lora_jax.core.checkpoint import CorruptCheckpoint

    trainable, _, opt_state, _, _ = setup()
    with AdapterCheckpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="Out of range float values"):
            ckpt.save(1, trainable, opt_state, CONFIG, extra={"losses": [float("nan")]})
        ckpt.save(1, trainable, opt_state, CONFIG)
        ckpt.wait()
        (tmp_path / "1" / "meta" / "metadata").write_bytes(b"\xff")
        with pytest.raises(CorruptCheckpoint, match="no intact checkpoint in .*not valid JSON"):
            ckpt.restore_intact(target=(trainable, opt_state))


def test_the_digest_is_checked_when_the_target_has_another_dtype(tmp_path):
    """Restoring onto a bfloat16 target (orbax casts) still checks the SHA-256 of the arrays
    as saved: before, the check was skipped when the dtypes differed, and a flipped exponent
    bit restored as a value of ~1e21."""
    from lora_jax.core.checkpoint import CorruptCheckpoint

    trainable, opt_state = _two_steps(tmp_path)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), trainable)
    with AdapterCheckpointer(tmp_path) as ckpt:  # intact: restored as saved, then cast
        _, got, _, _ = ckpt.restore(2, target=(bf16, opt_state))
        _, want, _, _ = ckpt.restore(2, target=(trainable, opt_state))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == jnp.bfloat16 and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))
    data = max((p for p in (tmp_path / "2" / "trainable").rglob("*")
                if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40  # one bit, as a bad disk would
    data.write_bytes(bytes(raw))
    before = data.read_bytes()
    with AdapterCheckpointer(tmp_path) as ckpt:
        for target in (bf16, trainable):
            with pytest.raises(CorruptCheckpoint, match=f"checkpoint {tmp_path / '2'}: the "
                                                        "arrays do not match the digest"):
                ckpt.restore(2, target=(target, opt_state))
    assert data.read_bytes() == before


def test_a_target_of_other_shapes_is_a_mismatch_not_a_damaged_step(tmp_path):
    """Restoring onto a target whose arrays differ in shape (the run's settings changed) raises
    CheckpointMismatch from the metadata, before orbax reads anything; restore_intact raises it
    at once instead of setting every step aside as unreadable."""
    from lora_jax.core.checkpoint import CheckpointMismatch

    _two_steps(tmp_path)
    config = lora_jax.LoraConfig(r=2, lora_alpha=8, target_modules=["up", "down"],
                                 bias="lora_only")
    model, x = MLP(), jnp.ones((32, 16))
    params = lora_jax.inject(model.init(jax.random.key(0), x)["params"], config,
                             jax.random.key(2))
    trainable, _ = lora_jax.split(params, config)
    target = (trainable, lora_jax.optimizer(optax.adam(1e-2), params, config).init(params))
    with AdapterCheckpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointMismatch, match=r"checkpoint .*2 does not fit the restore "
                                                     r"target: \[0\]\['down'\]\['lora_A'\] is "
                                                     r"\(256, 4\) in the checkpoint, \(256, 2\) "
                                                     r"in the target"):
            ckpt.restore(2, target=target)
        with pytest.raises(CheckpointMismatch):
            ckpt.restore_intact(target=target)
        assert ckpt.all_steps() == [1, 2]
    assert not (tmp_path.parent / (tmp_path.name + ".unreadable")).exists()
