"""The contract every adapter method keeps, in both frontends, on every layer kind (and on a
quantized base and in an adapter set where the method supports them): the default init is the
base exactly, adapted == merged, a training step moves only the trainable leaves, peft reads
and writes its files (torch twins of the layer are the oracle), a sharded step equals one
device, and the kinds a method refuses are refused with the reason. Rows: contract/variants.py;
kinds: contract/layers.py; frontends: contract/frontends.py."""

import functools
import re

import jax
import numpy as np
import pytest
from budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_zoo import single_layer

import lora_jax
from contract import layers
from contract.frontends import FRONTENDS, KINDS, PEFT_REFUSED, QUANTIZED, QUANTIZED_KINDS, leaves
from contract.variants import VARIANTS

pytestmark = pytest.mark.filterwarnings("ignore:.*has no layer rule:UserWarning")


def _close(actual, expected, rtol=1e-5):
    """float32: within `rtol` of the expected output's largest magnitude."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-6)
    assert np.abs(actual - expected).max() <= rtol * scale, np.abs(actual - expected).max() / scale


def _refused(kind, variant):
    return VARIANTS[variant].refused.get(kind.removesuffix("-scan"))


def _bases(frontend, kind, variant):
    return ["float"] + [base for base in QUANTIZED[frontend]
                        if VARIANTS[variant].quantized and kind in QUANTIZED_KINDS[base]]


# (frontend, kind, variant, base): every combination a method supports
CASES = [(frontend, kind, variant, base) for frontend in FRONTENDS for kind in KINDS[frontend]
         for variant in VARIANTS if not _refused(kind, variant)
         for base in _bases(frontend, kind, variant)]
FLOAT_CORE = [case for case in CASES if case[3] == "float" and case[1] in layers.CORE]


def _id(case):
    return "-".join(part for part in case if part != "float")


def _build(case, init, sharded=False):
    frontend, kind, variant, base = case
    run = FRONTENDS[frontend](kind, base, sharded=sharded)
    return run.inject(VARIANTS[variant].config(init, **run.targets))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_default_init_is_the_base_exactly(case):
    run = _build(case, init=True)
    rtol = VARIANTS[case[2]].init_rtol
    if rtol:
        _close(run.out(), run.base_out, rtol)
    else:
        np.testing.assert_array_equal(run.out(), run.base_out)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_adapted_equals_merged(case):
    run = _build(case, init=False)
    out = run.out()
    assert not np.allclose(out, run.base_out, atol=1e-3)  # the adapter changes the output
    _close(out, run.merged_out())


@functools.cache  # one compiled training run per case and placement, shared by the tests below
def _trained(case, sharded):
    run = _build(case, init=False, sharded=sharded)
    before = {path: np.asarray(value) for path, value in leaves(run.tree()).items()}
    losses = run.train()
    return before, leaves(run.tree()), losses


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_a_training_step_moves_only_the_trainable_leaves(case):
    before, after, losses = _trained(case, sharded=False)
    trains = re.compile(VARIANTS[case[2]].trains)
    expected = {path for path in before if trains.search(path.rsplit(".", 1)[-1])}
    moved = {path for path in before if not np.array_equal(before[path], after[path])}
    assert expected and moved == expected, (sorted(moved), sorted(expected))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("case", FLOAT_CORE, ids=_id)
def test_a_sharded_step_equals_one_device(case):
    """The weight sharded over a 2 x 4 (fsdp, tensor) mesh: the adapter's leaves are placed on
    the mesh, partitioned where the weight is, and three steps give one device's losses and
    leaves."""
    _, single, losses = _trained(case, sharded=False)
    _, sharded, sharded_losses = _trained(case, sharded=True)
    np.testing.assert_allclose(sharded_losses, losses, rtol=1e-5)
    trains = re.compile(VARIANTS[case[2]].trains)
    adapter = [value for path, value in sharded.items() if trains.search(path.rsplit(".", 1)[-1])]
    assert all(value.sharding.mesh.shape_tuple == (("fsdp", 2), ("tensor", 4))
               for value in adapter)
    assert any(not value.sharding.is_fully_replicated for value in adapter) == \
        VARIANTS[case[2]].sharded
    for path, value in single.items():
        np.testing.assert_allclose(np.asarray(sharded[path]), np.asarray(value), rtol=1e-5,
                                   atol=1e-6, err_msg=path)


PEFT_CASES = [case for case in FLOAT_CORE if case[:2] not in PEFT_REFUSED]


@pytest.mark.parametrize("case", PEFT_CASES, ids=_id)
def test_peft_reads_our_files_and_we_read_peft_files(case, tmp_path):
    """Our file loaded by peft onto the layer's PyTorch twin gives our output; peft's file of
    that adapter loaded back gives it again."""
    import peft

    run = _build(case, init=False)
    ours = np.asarray(run.out())
    twin, forward = layers.torch_twin(case[1], run.base_layer())
    base = forward(twin, run.x)
    _close(base, np.asarray(run.base_out).reshape(base.shape))  # the twin is the base layer
    run.save_peft(tmp_path / "ours")
    peft_model = peft.PeftModel.from_pretrained(twin, tmp_path / "ours").eval()
    theirs = forward(peft_model, run.x)
    assert not np.allclose(theirs, base, atol=1e-3)
    _close(theirs, ours.reshape(theirs.shape))
    peft_model.save_pretrained(tmp_path / "theirs")
    _close(run.load_peft(tmp_path / "theirs").out(), ours)


@pytest.mark.parametrize("case", sorted(PEFT_REFUSED), ids="-".join)
def test_weights_peft_files_do_not_hold_are_refused(case, tmp_path):
    run = _build((*case, "lora", "float"), init=False)
    with pytest.raises(ValueError, match=PEFT_REFUSED[case]):
        run.save_peft(tmp_path)


REFUSED = [(frontend, kind, variant) for frontend in FRONTENDS for kind in KINDS[frontend]
           for variant in VARIANTS if _refused(kind, variant)]


@pytest.mark.parametrize("case", REFUSED, ids="-".join)
def test_a_refused_kind_says_why(case):
    frontend, kind, variant = case
    # A config without the targeting field a kind needs is a TypeError naming the field.
    with pytest.raises((ValueError, TypeError), match=_refused(kind, variant)):
        _build((*case, "float"), init=False)


SET_CASES = [case for case in FLOAT_CORE if case[0] == "linen" and VARIANTS[case[2]].adapter_sets]


@pytest.mark.parametrize("case", SET_CASES, ids=_id)
def test_a_mixed_batch_equals_each_example_with_its_own_adapter(case):
    """Two adapters in a `lora_jax.adapters` set: each example of a mixed batch (one slot each,
    None for the base alone) gives what its own adapter gives it alone."""
    run = _build(case, init=False)
    members = {name: (run.inject(run.config, key).params, run.config)
               for key, name in ((1, "a"), (2, "b"))}
    aset = lora_jax.adapters.adapter_set(members)
    slots = ["a", "b", None, "a"][:len(run.x)]
    apply = lora_jax.wrap(run.model.apply, run.config)
    mixed = apply({"params": aset.params}, run.x, adapter_ids=aset.ids(slots))
    for i, slot in enumerate(slots):
        x = run.x[i:i + 1]
        alone = run.model.apply({"params": run.base}, x) if slot is None else \
            lora_jax.wrap(run.model.apply, run.config)({"params": members[slot][0]}, x)
        _close(mixed[i:i + 1], alone)
    assert not np.allclose(mixed[0], apply({"params": members["b"][0]}, run.x)[0], atol=1e-3)


@settings(max_examples=examples(8), deadline=None)
@given(case=st.sampled_from([(kind, variant) for kind in layers.CORE for variant in VARIANTS
                             if not _refused(kind, variant)]),
       dim=st.integers(4, 12), out=st.integers(3, 9), seed=st.integers(0, 1000))
def test_at_random_sizes_the_default_is_the_base_and_adapted_equals_merged(case, dim, out, seed):
    """linen, the core kinds, drawn sizes and seeds (out >= 3 > r = 2)."""
    kind, variant = case
    model, x = single_layer(kind, dim, out)
    base = model.init(jax.random.key(seed), x)["params"]
    found = lora_jax.layouts(model, x)
    for init in (True, False):
        config = VARIANTS[variant].config(init, **layers.LAYER)
        params = lora_jax.inject(base, config, jax.random.key(seed + 1), layouts=found)
        adapted = lora_jax.wrap(model.apply, config)({"params": params}, x)
        if init:
            np.testing.assert_array_equal(adapted, model.apply({"params": base}, x))
        else:
            assert not np.allclose(adapted, model.apply({"params": base}, x))
            _close(adapted, model.apply({"params": lora_jax.merge(params, config)}, x))
