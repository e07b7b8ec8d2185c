"""phi3_lightning: train, fine-tune, evaluate and study Phi-3-family models with Lightning."""

from .model import (
    Phi3Config,
    Phi3ForCausalLM,
    Phi3ForSequenceClassification,
    Phi3ForTokenClassification,
    Phi3Model,
    get_preset,
)

__version__ = "0.1.0"
__all__ = [
    "Phi3Config",
    "Phi3ForCausalLM",
    "Phi3ForSequenceClassification",
    "Phi3ForTokenClassification",
    "Phi3Model",
    "get_preset",
    "__version__",
]
