"""LightningModules for the three Phi-3 heads, plus the callbacks, schedulers and strategies the CLI uses.

``CausalLMModule``, ``SequenceClassificationModule`` and ``TokenClassificationModule`` share
:class:`Phi3LightningModule` (model building, configure_model with compile / activation checkpointing / FSDP2,
optimizers, checkpoint metadata).
"""

from .base import COMPILE_SCOPES, Phi3LightningModule, resolve_model
from .callbacks import LearningRateMonitor, Phi3ThroughputMonitor, PredictionWriter
from .causal_lm import CausalLMModule
from .loading import LoadedHead, export_adapter, export_checkpoint, load_head
from .loggers import Phi3TensorBoardLogger
from .schedulers import WarmupDecayLR
from .sequence_classification import SequenceClassificationModule
from .strategies import AtomicCheckpointIO, FSDP2Strategy, Phi3FSDPStrategy
from .tasks import MODULES
from .token_classification import TokenClassificationModule

__all__ = [
    "AtomicCheckpointIO",
    "COMPILE_SCOPES",
    "CausalLMModule",
    "FSDP2Strategy",
    "LearningRateMonitor",
    "LoadedHead",
    "MODULES",
    "Phi3FSDPStrategy",
    "Phi3LightningModule",
    "Phi3TensorBoardLogger",
    "Phi3ThroughputMonitor",
    "PredictionWriter",
    "SequenceClassificationModule",
    "TokenClassificationModule",
    "WarmupDecayLR",
    "export_adapter",
    "export_checkpoint",
    "load_head",
    "resolve_model",
]
