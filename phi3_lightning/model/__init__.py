"""Plain-PyTorch Phi-3 (no Lightning imports): ``import phi3_lightning.model`` works on its own."""

from .backbone import Phi3Model
from .backends import (
    BACKENDS,
    DEFAULT_BACKEND,
    Backend,
    backend_available,
    check_backend,
    flash_kernel,
    set_flash_kernels,
    use_torch_flash_impl,
)
from .cache import KVCache
from .config import PRESETS, Phi3Config, get_preset, resolve_model
from .generation import generate
from .heads import (
    ARCHITECTURE_TASKS,
    HEADS,
    TASKS,
    ModelOutput,
    Phi3ForCausalLM,
    Phi3ForSequenceClassification,
    Phi3ForTokenClassification,
)

__all__ = [
    "ARCHITECTURE_TASKS",
    "BACKENDS",
    "DEFAULT_BACKEND",
    "Backend",
    "HEADS",
    "KVCache",
    "ModelOutput",
    "PRESETS",
    "Phi3Config",
    "Phi3ForCausalLM",
    "Phi3ForSequenceClassification",
    "Phi3ForTokenClassification",
    "Phi3Model",
    "TASKS",
    "backend_available",
    "check_backend",
    "flash_kernel",
    "generate",
    "get_preset",
    "resolve_model",
    "set_flash_kernels",
    "use_torch_flash_impl",
]
