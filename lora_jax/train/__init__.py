"""Training for the command line: the jitted loop, datasets and prompt-tuning."""
