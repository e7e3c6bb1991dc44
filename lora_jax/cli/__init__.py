"""The `lora-jax` command line, one module per job.

- `main`: the argument parser, `--resume`'s saved flags, exit statuses;
- `model`: `--model` resolved, checked against `--task` and loaded;
- `method`: LoRA / full / prompt / head set up on a loaded model (params, forward, optimizer);
- `finetune`: data, training with checkpoints, evaluation, the run folder;
- `sweep`: `finetune --sweep`, K LoRA runs in one compiled step;
- `nnx_run`: `finetune --frontend nnx`, the run's forward on the NNX models;
- `generate`, `merge`: the other two commands;
- `adapter`: adapter folders checked before use and saved;
- `files`: JSON read with errors naming the file, files and folders written whole or not at all.
"""
