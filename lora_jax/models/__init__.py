"""Reference models with HF parameter paths (GPT-2, BERT, Llama, BLOOM, T5) and their loaders.

    from lora_jax.models import from_pretrained, load_tokenizer
    module, params = from_pretrained("path/to/hf_folder")   # config.json + safetensors
    module, params = from_torch(hf_model)                     # a transformers PyTorch model
    save_hf("out/", module, params)                           # and back to an HF folder

The architecture modules (`lora_jax.models.bert`, `.t5`, ...) are imported on first access.
"""

from types import ModuleType

from lora_jax.models.loading import from_pretrained, from_torch, load_tokenizer, save_hf
from lora_jax.models.registry import ARCHITECTURES, Architecture, architecture

__all__ = ["ARCHITECTURES", "Architecture", "architecture", "from_pretrained", "from_torch",
           "load_tokenizer", "save_hf"]


def __getattr__(name: str) -> ModuleType:
    """Lazy `lora_jax.models.<architecture>` (e.g. `lora_jax.models.t5`)."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name].module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
