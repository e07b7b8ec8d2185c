"""The task registry of the modules layer: task name -> LightningModule.

The tasks themselves, and their heads, are the model layer's (:data:`phi3_lightning.model.heads.HEADS`); each
LightningModule names its task (``task = "causal_lm"``) and gets its head class from there. Everything here is
derived from that, so adding a head is: the head class + ``HEADS`` entry in ``model/heads.py``, its LightningModule
with ``task`` set, and one entry below.
"""

from __future__ import annotations

from ..model.heads import HEADS
from .base import Phi3LightningModule
from .causal_lm import CausalLMModule
from .sequence_classification import SequenceClassificationModule
from .token_classification import TokenClassificationModule

MODULES: dict[str, type[Phi3LightningModule]] = {
    m.task: m for m in (CausalLMModule, SequenceClassificationModule, TokenClassificationModule)
}
if set(MODULES) != set(HEADS):  # a head without a LightningModule or the reverse: a programming error
    raise RuntimeError(f"tasks with a head {sorted(HEADS)} differ from tasks with a LightningModule {sorted(MODULES)}")

MODULE_TASKS = {cls.__name__: task for task, cls in MODULES.items()}
"""LightningModule class name -> task (how checkpoints and configs name the module: ``_class_path``)."""


def task_name(class_path: str) -> str:
    """The task of a LightningModule class path (``phi3_lightning.modules.CausalLMModule`` -> ``causal_lm``); an
    unknown class gives its lower-cased class name."""
    name = str(class_path).rsplit(".", 1)[-1]
    return MODULE_TASKS.get(name, name.lower())
