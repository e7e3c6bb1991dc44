"""Differential test against peft: hypothesis draws peft LoraConfigs over its field space
(target lists of names, dotted suffixes and full per-layer paths, regexes, "all-linear",
exclude_modules, layers_to_transform with and without layers_pattern, rank/alpha patterns,
rslora, the three bias modes, modules_to_save) on tiny GPT-2, BERT, Llama, BLOOM and T5,
scanned and unscanned, and runs each through peft and lora_jax (tests/parity_harness.py):
validity, adapted modules with r and scaling, trainable count, logits (1e-4; where float32
disagrees, against peft in float64: T5's unscaled attention amplifies rounding), merge, export
(save_peft -> PeftModel.from_pretrained) and import (peft save_pretrained -> load_peft).

The CI tier runs 2 fixed configs per architecture (derandomized); the full tier (LORA_JAX_FULL=1,
tests/budget.py) runs 200 random ones per architecture (`-k gpt2` to pick one).

Documented disagreements are accepted, and only these (see README / issue 15):
- T5 `shared`: peft with transformers 5 never calls its adapter or its modules_to_save copy;
  lora_jax applies them to the lookups (logits);
- bias="lora_only" with only some layers of a scanned stack adapted, on a stack with biases:
  lora_jax raises (the stacked bias is one trainable leaf), peft trains those layers' biases;
- modules_to_save entries that nest (BERT "output" holds "LayerNorm"): peft puts one wrapper
  inside another and its files for them are not well defined;
- (not generated) a regex that also hits a module without parameters (an activation, a
  dropout): peft raises on it, lora_jax never sees it (the params tree has no such module);
- peft's code lets full module names skip layers_to_transform; lora_jax applies the filter
  (the harness loads peft's file and checks that peft loads lora_jax's with its own modules).
- (not a disagreement) two rank/alpha_pattern keys matching one module: peft's in-memory model
  takes the first in dict order, its saved file (sorted keys) the other; the harness compares
  the import with peft's own reload of its file (test_peft_parity).
"""

import tempfile
import time

import pytest
from budget import FULL, examples
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from parity_harness import ARCHS, compare

STATS: dict[str, list[float]] = {}


@st.composite
def peft_fields(draw, name):
    arch = ARCHS[name]
    names = st.sampled_from(arch.linear + arch.other[:2] + arch.paths)
    kind = draw(st.sampled_from(["list", "list", "list", "regex", "all-linear"]))
    fields = {"r": draw(st.sampled_from([1, 2, 4, 8])),
              "lora_alpha": draw(st.sampled_from([4, 8, 16]))}
    if kind == "list":
        fields["target_modules"] = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    elif kind == "regex":
        fields["target_modules"] = draw(st.sampled_from(arch.regexes))
    else:
        fields["target_modules"] = "all-linear"
    if draw(st.booleans()):
        fields["exclude_modules"] = draw(st.one_of(
            st.lists(st.sampled_from(arch.linear + arch.paths), min_size=1, max_size=2,
                     unique=True), st.sampled_from(arch.regexes)))
    if kind == "list" and draw(st.booleans()):
        fields["layers_to_transform"] = draw(st.sampled_from([[], [0], [1], [0, 1], [1, 5]]))
        if draw(st.booleans()):
            fields["layers_pattern"] = draw(st.sampled_from([arch.layers_pattern, "nope"]))
    pattern_keys = st.sampled_from(arch.linear[:3] + arch.paths)
    if draw(st.booleans()):
        fields["rank_pattern"] = draw(st.dictionaries(pattern_keys, st.sampled_from([1, 2, 4]),
                                                      max_size=2))
    if draw(st.booleans()):
        fields["alpha_pattern"] = draw(st.dictionaries(pattern_keys, st.sampled_from([2, 32]),
                                                       max_size=2))
    fields["use_rslora"] = draw(st.booleans())
    fields["bias"] = draw(st.sampled_from(["none", "all", "lora_only"]))
    if draw(st.booleans()):
        # Not names that are also a suffix of a child's name (GPT-2 "attn" and "attn.c_attn":
        # peft nests two wrappers).
        saved = [m for m in arch.other if m != "attn"]
        fields["modules_to_save"] = draw(st.lists(st.sampled_from(saved), min_size=1,
                                                  max_size=2, unique=True))
    return fields


def _documented(fields, scan, result, name):
    """The accepted disagreements (module docstring); anything else fails."""
    left = []
    if result.nested_saved:
        return left  # peft nests modules_to_save wrappers: its own files are ill-defined
    for d in result.disagreements:
        if name == "t5" and "logits" in d and ("shared" in {**result.our_targets,
                                                            **result.peft_targets}
                                               or "shared" in (fields.get("modules_to_save")
                                                               or [])):
            continue  # peft never calls T5's `shared` (adapted or saved): classes 7 and 8
        if d.startswith("validity") and scan and result.ours_error and \
                "bias='lora_only' with only some layers" in result.ours_error:
            continue  # a stacked bias is one leaf: lora_jax refuses to train it for some layers
        if d.startswith("validity") and result.quirk:
            continue  # peft adapts full names outside layers_to_transform; lora_jax: none left
        left.append(d)
    return left


FAILURES: dict[str, list[tuple]] = {}
OUTCOMES: dict[str, dict[str, int]] = {}


def _run(name, scan, fields):
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = compare(name, fields, scan, tmp)
    STATS.setdefault(name, []).append(time.perf_counter() - start)
    left = _documented(fields, scan, result, name)
    outcome = ("disagree" if left else "documented" if result.disagreements or result.quirk else
               "both refuse" if result.peft_error and result.ours_error else "agree")
    OUTCOMES.setdefault(name, {}).setdefault(outcome, 0)
    OUTCOMES[name][outcome] += 1
    if left and FULL:  # a long run: collect every disagreement, report them at the end
        FAILURES.setdefault(name, []).append((scan, fields, left))
        return
    assert not left, (name, scan, fields, left, result.peft_error, result.ours_error)


@pytest.mark.parametrize("name", list(ARCHS))
def test_differential_against_peft(name):
    @settings(max_examples=examples(2, 200), deadline=None, derandomize=not FULL, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True,
              phases=[Phase.explicit, Phase.generate])  # no shrinking: examples are costly
    @given(fields=peft_fields(name), scan=st.booleans())
    def check(fields, scan):
        _run(name, scan, fields)

    check()
    times = STATS.get(name, [])
    failed = FAILURES.get(name, [])
    print(f"{name}: {len(times)} configs in {sum(times):.0f} s, {len(failed)} disagreements; "
          f"{OUTCOMES.get(name)}")
    for scan, fields, left in failed:
        print(f"  scan={scan} {fields}: {[d[:300] for d in left]}")
    assert not failed
