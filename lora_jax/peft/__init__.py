"""peft interop: read and write peft adapter folders (`adapter_config.json` +
`adapter_model.safetensors`)."""
