"""The `lora-jax` command line: argument parsing (`main`) and the runs behind it."""
