"""optimizer: optax updates only trainable leaves, and keeps state only for them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from layer_zoo import TinyLM

import lora_jax
from lora_jax import LoraConfig

IDS = jnp.arange(12).reshape(2, 6) % 32


def _setup(config, scan=False):
    model = TinyLM(scan=scan)
    params = model.init(jax.random.key(0), IDS)["params"]
    layouts = lora_jax.layouts(model, IDS) if scan else None
    params = lora_jax.inject(params, config, jax.random.key(1), layouts=layouts)
    apply = lora_jax.wrap(model.apply, config)

    def loss(p):
        logits = apply({"params": p}, IDS)
        return optax.softmax_cross_entropy_with_integer_labels(logits, (IDS + 1) % 32).mean()

    return params, loss


def _train(params, loss, tx, steps=5):
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    losses = []
    for _ in range(steps):
        params, state, value = step(params, state)
        losses.append(float(value))
    return params, state, losses


def _nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_adam_state_is_twice_the_trainable_bytes():
    config = LoraConfig(r=4, target_modules=["q", "v"])
    params, _ = _setup(config)
    state = lora_jax.optimizer(optax.adam(1e-3), params, config).init(params)
    trainable, _ = lora_jax.split(params, config)
    moments = [s for s in jax.tree.leaves(state) if s.ndim > 0]  # drop the step counter
    assert sum(m.nbytes for m in moments) == 2 * _nbytes(trainable)


def test_steps_change_only_trainable_leaves_and_lower_the_loss():
    config = LoraConfig(r=4, target_modules=["q", "v"], modules_to_save=["lm_head"])
    params, loss = _setup(config)
    tx = lora_jax.optimizer(optax.adamw(3e-2, weight_decay=0.1), params, config)
    trained, _, losses = _train(params, loss, tx)
    before_t, before_f = lora_jax.split(params, config)
    after_t, after_f = lora_jax.split(trained, config)
    jax.tree.map(np.testing.assert_array_equal, after_f, before_f)  # frozen: bit-identical
    changed = jax.tree.map(lambda a, b: bool((a != b).any()), after_t, before_t)
    assert all(jax.tree.leaves(changed))
    assert losses[-1] < losses[0]


def test_unselected_scanned_layers_stay_zero_under_adamw():
    config = LoraConfig(r=2, target_modules=["q", "v"], layers_to_transform=[1])
    params, loss = _setup(config, scan=True)
    tx = lora_jax.optimizer(optax.adamw(3e-2, weight_decay=0.1), params, config)
    trained, _, _ = _train(params, loss, tx)
    for name in ("q", "v"):
        a, b = trained["h"][name]["lora_A"], trained["h"][name]["lora_B"]
        assert not a[0].any() and not a[2].any() and not b[0].any() and not b[2].any()
        assert b[1].any()


def test_optimizer_needs_factors():
    model = TinyLM()
    params = model.init(jax.random.key(0), IDS)["params"]
    with pytest.raises(ValueError, match="hold no LoRA factors: call lora_jax.inject"):
        lora_jax.optimizer(optax.adam(1e-3), params, LoraConfig(target_modules=["q"]))
