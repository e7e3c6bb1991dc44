"""LoRA training on a data x fsdp x tensor mesh: the same script on one host or many.

One process (all local devices):
    python experiments/train_sharded.py --model gpt2 --mesh 2,2,2 --steps 5

Several processes (each runs this with its own --process-id; on a TPU pod or SLURM job use
--distributed auto instead and JAX finds the coordinator):
    python experiments/train_sharded.py --mesh 2,2,2 --coordinator 10.0.0.1:1234 \
        --num-processes 2 --process-id 0

CPU simulation of 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu.
The model is a small random GPT-2 or Llama (sizes by flag) and the data a deterministic random
token stream, so runs on different device counts can be compared loss for loss. The frozen base is
created sharded (jit of `init` with out_shardings), the factors by `shard_inject`, each process
feeds only its rows of the global batch, and adapter checkpoints (`--checkpoint-dir`) resume.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax
from lora_jax.core import distributed
from lora_jax.core.checkpoint import AdapterCheckpointer
from lora_jax.core.sharding import match_specs, named_shardings, opt_state_specs, shard_inject
from lora_jax.models import gpt2, llama

# Megatron-style tensor parallelism with fsdp on the other weight axis (the models' rules).
RULES = {"gpt2": gpt2.SHARDING_RULES, "llama": llama.SHARDING_RULES}
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": "all-linear"}


def build_model(name: str, hidden: int, layers: int, vocab: int, seq: int):
    if name == "gpt2":
        config = gpt2.Config(vocab_size=vocab, n_positions=seq, n_embd=hidden, n_layer=layers,
                             n_head=4)
        return gpt2.build(config, scan_layers=True)
    config = llama.Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=seq)
    return llama.build(config, scan_layers=True)


def make_train_step(model, config, tx):
    """`step(trainable, frozen, opt_state, ids) -> (trainable, opt_state, loss)`: next-token loss,
    gradients of the trainable half only, and `tx` (a `lora_jax.optimizer`) on that half."""
    apply = lora_jax.wrap(model.apply, config)

    def step(trainable, frozen, opt_state, ids):
        def loss_fn(trainable):
            logits = apply({"params": lora_jax.combine(trainable, frozen)}, ids[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def global_batch(step: int, batch: int, seq: int, vocab: int) -> np.ndarray:
    """The step's whole batch, identical on every process (each keeps its own rows)."""
    return np.random.default_rng(step).integers(0, vocab, (batch, seq + 1), dtype=np.int32)


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(RULES), default="gpt2")
    parser.add_argument("--mesh", default="2,2,2", help="data,fsdp,tensor sizes")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--distributed", choices=["off", "auto"], default="off",
                        help="auto: jax.distributed.initialize() finds the cluster itself")
    parser.add_argument("--coordinator", help="host:port of process 0 (manual multi-process)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--losses-out", help="write the losses as JSON (process 0)")
    args = parser.parse_args(argv)

    if args.distributed == "auto":
        distributed.initialize()
    elif args.num_processes > 1:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    shape = tuple(int(n) for n in args.mesh.split(","))
    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    model = build_model(args.model, args.hidden, args.layers, args.vocab, args.seq)
    example = jnp.zeros((1, args.seq), jnp.int32)

    # The frozen base is created on its devices, never whole on one of them.
    abstract = jax.eval_shape(model.init, jax.random.key(0), example)["params"]
    base_shardings = named_shardings(match_specs(abstract, RULES[args.model]), mesh, abstract)
    base = jax.jit(lambda k: model.init(k, example)["params"], out_shardings=base_shardings)(
        jax.random.key(0))
    config = lora_jax.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                 target_modules=TARGETS[args.model])
    params = shard_inject(base, config, jax.random.key(1), mesh,
                          layouts=lora_jax.layouts(model, example))
    if jax.process_index() == 0:
        lora_jax.print_trainable_parameters(params, config)

    tx = lora_jax.optimizer(optax.adamw(args.lr), params, config)
    trainable, frozen = lora_jax.split(params, config)
    t_sh, f_sh = (jax.tree.map(lambda a: a.sharding, t) for t in (trainable, frozen))
    o_sh = named_shardings(opt_state_specs(jax.eval_shape(tx.init, params),
                                           jax.tree.map(lambda s: s.spec, t_sh)), mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    b_sh = distributed.batch_sharding(mesh)
    step_fn = jax.jit(make_train_step(model, config, tx), in_shardings=(t_sh, f_sh, o_sh, b_sh),
                      out_shardings=(t_sh, o_sh, NamedSharding(mesh, P())),
                      donate_argnums=(0, 2))
    rows = distributed.process_rows(args.batch, mesh)

    ckpt = AdapterCheckpointer(args.checkpoint_dir, save_every=args.save_every,
                               max_to_keep=2) if args.checkpoint_dir else None
    start = 0
    if ckpt is not None and ckpt.latest_step() is not None:
        start, trainable, opt_state, _ = ckpt.restore(target=(trainable, opt_state))
    losses = []
    for step in range(start + 1, args.steps + 1):
        t0 = time.perf_counter()
        ids = distributed.shard_batch(global_batch(step, args.batch, args.seq, args.vocab)[rows],
                                      mesh)
        trainable, opt_state, loss = step_fn(trainable, frozen, opt_state, ids)
        losses.append(float(loss))
        if ckpt is not None:
            ckpt.save(step, trainable, opt_state, config)
        if jax.process_index() == 0:
            print(f"step {step} loss {losses[-1]:.6f} ({time.perf_counter() - t0:.2f} s)",
                  flush=True)
    if ckpt is not None:
        ckpt.close()
    if args.losses_out and jax.process_index() == 0:
        with open(args.losses_out, "w") as f:
            json.dump({"start": start, "losses": losses, "devices": jax.device_count(),
                       "processes": jax.process_count()}, f)
    return losses


if __name__ == "__main__":
    main()
