"""Nothing bypasses `wrap`'s interceptor silently: Gemma's two traits on minimal modules (a
`__getattr__`, an `nn.jit`-decorated `__call__`), layers that run without their delta, a forward
that reaches no adapted layer, and heads tied through another layer's `.apply`."""

import dataclasses
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax

X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
CONFIG = lora_jax.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)


class WithGetattr(nn.Module):
    """Gemma's modules define `__getattr__` (flax makes it a module method)."""

    def setup(self):
        self.d = nn.Dense(4)

    def __getattr__(self, name):
        return super().__getattr__(name)

    def __call__(self, x):
        return self.d(x)


class Jitted(nn.Module):
    """Gemma 3's Transformer decorates `__call__` with `nn.jit`."""

    @nn.jit
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="d")(x)


def _adapted(model, **kwargs):
    base = model.init(jax.random.key(0), X)["params"]
    params = lora_jax.inject(base, CONFIG, jax.random.key(1), **kwargs)
    return base, params


@pytest.mark.parametrize("model", [WithGetattr(), Jitted()], ids=["getattr", "nn.jit"])
def test_wrapped_equals_merged_on_gemma_traits(model):
    # Before: WithGetattr raised RecursionError (the quantized-base interceptor's getattr
    # re-entered it); Jitted's second layouts() was {} and, once the plain forward had cached
    # its trace, the wrapped forward was the plain one (|wrapped - merged| = 2.09).
    assert lora_jax.layouts(model, X) == lora_jax.layouts(model, X) != {}
    base, params = _adapted(model, layouts=lora_jax.layouts(model, X))
    plain = model.apply({"params": params}, X)  # caches nn.jit's trace without the LoRA
    wrapped = lora_jax.wrap(model.apply, CONFIG)({"params": params}, X)
    merged = model.apply({"params": lora_jax.merge(params, CONFIG)}, X)
    assert float(jnp.abs(plain - model.apply({"params": base}, X)).max()) == 0.0
    assert float(jnp.abs(wrapped - plain).max()) > 0.1
    np.testing.assert_allclose(wrapped, merged, atol=1e-5)
    again = lora_jax.wrap(model.apply, CONFIG)({"params": params}, X)  # replays its own trace
    np.testing.assert_allclose(again, merged, atol=1e-5)


class ReadsItsWeight(nn.Module):
    """Calls no adapted layer: reads the Dense's kernel itself."""

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(4, name="d")
        if self.is_initializing():
            return dense(x)
        return x @ dense.variables["params"]["kernel"]


class Transposed(nn.Dense):
    def back(self, y):
        return y @ self.variables["params"]["kernel"].T


class OtherMethod(nn.Module):
    """Runs its adapted layer through a method other than `__call__`."""

    @nn.compact
    def __call__(self, x):
        layer = Transposed(3, name="p")
        return layer(x) if self.is_initializing() else layer.back(x)


@pytest.mark.parametrize("model, message", [
    (ReadsItsWeight(), r"reached none of the 1 adapted layers \(\['d'\]\)"),
    (OtherMethod(), r"\['p'\] ran in the wrapped forward without their LoRA delta"),
], ids=["reads_weight", "other_method"])
def test_a_forward_that_skips_an_adapted_weight_is_an_error(model, message):
    # Before: both returned the base model's output.
    _, params = _adapted(model)
    with pytest.raises(ValueError, match=message):
        lora_jax.wrap(model.apply, CONFIG)({"params": params}, X)


class Tied(nn.Module):
    """A table and a head spelled `head`: transformers' Flax GPT-2 / Whisper tie
    (`lm_head.apply({"params": {"kernel": wte.T}})`), a raw `h @ table.T`, an einsum, under
    `jax.jit`, in a loop; or untied: a one-hot lookup (a matmul over the vocabulary axis) and
    a head of its own shaped like the table's transpose."""

    head: str

    def setup(self):
        self.wte = nn.Embed(7, 3)
        self.lm_head = nn.Dense(7, use_bias=False)

    def __call__(self, ids):
        h = self.wte(ids)
        table = self.wte.variables["params"]["embedding"]
        if self.head == "apply":
            return self.lm_head.apply({"params": {"kernel": table.T}}, h)
        if self.head == "transpose":
            return h @ table.T
        if self.head == "einsum":
            return jnp.einsum("btd,vd->btv", h, table * 2.0)
        if self.head == "jit":
            return jax.jit(lambda h, t: jnp.dot(h, t.T))(h, table)
        if self.head == "loop":
            head = lambda i, out: out + jnp.einsum("btd,dv->btv", h, table.T.astype(h.dtype))
            return jax.lax.fori_loop(0, 2, head, jnp.zeros((*h.shape[:2], 7)))
        if self.head == "one_hot":
            return jax.nn.one_hot(ids, 7) @ table
        return self.lm_head(h)  # untied


@pytest.mark.parametrize("head", ["apply", "transpose", "einsum", "jit", "loop"])
def test_a_head_tied_however_spelled_warns(head):
    # Before: no warning for any of these; wrapped and merged logits differ (the head reads
    # the original table). A head `.apply`d with a weight shaped like the table warned by shape.
    model, ids = Tied(head), jnp.array([[1, 2, 3]])
    base = model.init(jax.random.key(0), ids)["params"]
    config = lora_jax.LoraConfig(r=2, target_modules=["wte"], init_lora_weights=False)
    params = lora_jax.inject(base, config, jax.random.key(1))
    with pytest.warns(UserWarning, match=r"'wte' is adapted and also used as a tied output head "
                                         r"\(a matmul over its table\)"):
        wrapped = lora_jax.wrap(model.apply, config)({"params": params}, ids)
    merged = model.apply({"params": lora_jax.merge(params, config)}, ids)
    assert float(jnp.abs(wrapped - merged).max()) > 0.1  # why it warns
    with warnings.catch_warnings():  # the lookup alone is no tie
        warnings.simplefilter("error")
        lora_jax.wrap(model.apply, config)({"params": params}, ids, method=lambda m, i: m.wte(i))


@pytest.mark.parametrize("head", ["one_hot", "untied"])
def test_a_lookup_matmul_or_an_untied_head_does_not_warn(head):
    model, ids = Tied(head), jnp.array([[1, 2, 3]])
    base = model.init(jax.random.key(0), ids)["params"]
    config = lora_jax.LoraConfig(r=2, target_modules=["wte"], init_lora_weights=False)
    params = lora_jax.inject(base, config, jax.random.key(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_jax.wrap(model.apply, config)({"params": params}, ids)


class Square(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="q")(x)


def test_an_assumed_square_layout_is_refused_by_merge_and_save_peft_until_confirmed(tmp_path):
    # Before: the record did not say the [in, out] reading was a guess, and merge / save_peft
    # took it silently (a square [out, in] kernel gets the transposed delta in peft).
    model = Square()
    base = model.init(jax.random.key(0), X)["params"]
    guessed = lora_jax.inject(base, CONFIG, jax.random.key(1))
    assert guessed["q"]["lora"].layout.assumed
    refusal = r"'q' is a square kernel \(3, 3\) read as \[in, out\] from the tree alone"
    for what, call in (("merge", lambda **kw: lora_jax.merge(guessed, CONFIG, **kw)),
                       ("save_peft", lambda **kw: lora_jax.save_peft(tmp_path / "a", guessed,
                                                                     CONFIG, **kw))):
        with pytest.raises(ValueError, match=f"{what}: {refusal}"):
            call()
        assert not (tmp_path / "a").exists()
        call(layouts=lora_jax.layouts(model, X))  # the model confirms the reading
    loaded, config = lora_jax.load_peft(tmp_path / "a", base)
    with pytest.raises(ValueError, match=f"merge: {refusal}"):
        lora_jax.merge(loaded, config)
    known = lora_jax.inject(base, CONFIG, jax.random.key(1), layouts=lora_jax.layouts(model, X))
    assert not known["q"]["lora"].layout.assumed
    lora_jax.merge(known, CONFIG)
    lora_jax.save_peft(tmp_path / "b", known, CONFIG)
    lora_jax.load_peft(tmp_path / "b", base, layouts=lora_jax.layouts(model, X))
    # A model that reads the kernel [out, in] contradicts the assumed reading: refused.
    transposed = {"q": dataclasses.replace(lora_jax.layouts(model, X)["q"], order="oi")}
    with pytest.raises(ValueError, match=r"merge: 'q' was adapted as an \[in, out\] kernel, "
                                         r"but the model reads it as 'oi'"):
        lora_jax.merge(guessed, CONFIG, layouts=transposed)
    # A non-square kernel read the wrong way fails on shapes elsewhere: no refusal needed.
    wide = nn.Dense(5).init(jax.random.key(0), X)["params"]
    lora_jax.merge(lora_jax.inject({"q": wide}, CONFIG, jax.random.key(1)), CONFIG)


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        layer = nn.scan(lambda m, h, _: (m(h), None), variable_axes={"params": 0},
                        split_rngs={"params": True}, length=2)
        return layer(nn.Dense(3, name="q"), x, None)[0]


def test_a_stacked_square_kernel_loaded_without_layouts_is_refused_too(tmp_path):
    # A scanned stack [layers, in, out] is square in its last two axes.
    model = Stack()
    base = model.init(jax.random.key(0), X)["params"]
    layouts = lora_jax.layouts(model, X)
    params = lora_jax.inject(base, CONFIG, jax.random.key(1), layouts=layouts)
    lora_jax.save_peft(tmp_path, params, CONFIG, stacks=["q"])
    loaded, config = lora_jax.load_peft(tmp_path, base, stacks=["q"])
    with pytest.raises(ValueError, match=r"merge: 'q' is a square kernel \(2, 3, 3\)"):
        lora_jax.merge(loaded, config)
    lora_jax.merge(loaded, config, layouts=layouts)


def test_mixed_batch_ids_reach_a_jitted_call():
    # The ids are part of nn.jit's cache key: a second batch with other ids is not the first's.
    from lora_jax.multi.adapters import adapter_set, select

    model = Jitted()
    base = model.init(jax.random.key(0), X)["params"]
    aset = adapter_set({n: (lora_jax.inject(base, CONFIG, jax.random.key(s)), CONFIG)
                        for n, s in (("a", 1), ("b", 2))})
    apply = lora_jax.wrap(model.apply, CONFIG)
    alone = [apply({"params": select(aset.params, i)}, X) for i in (0, 1)]
    for ids in ([0, 1], [1, 0]):
        mixed = apply({"params": aset.params}, X, adapter_ids=jnp.array(ids))
        for row, i in enumerate(ids):
            np.testing.assert_allclose(mixed[row], alone[i][row], atol=1e-5)
