"""One task registry: model/heads.HEADS (task -> head) is read by the LightningModules, the loaders and the planner."""

from __future__ import annotations

import pytest

from phi3_lightning import memory
from phi3_lightning.model import ARCHITECTURE_TASKS, HEADS, TASKS
from phi3_lightning.modules import MODULES, Phi3LightningModule
from phi3_lightning.modules.tasks import task_name


def test_every_head_has_one_module_and_back():
    assert set(MODULES) == set(HEADS) == set(TASKS)
    for task, module in MODULES.items():
        assert module.task == task and module.head_class is HEADS[task]
        assert task_name(f"phi3_lightning.modules.{module.__name__}") == task
        assert ARCHITECTURE_TASKS[HEADS[task].architecture] == task


def test_unknown_class_path_is_its_lower_name():
    assert task_name("my.pkg.MyModule") == "mymodule"


def test_planner_heads_are_the_registry():
    with pytest.raises(ValueError, match="head='nope'.*causal_lm, sequence_classification, token_classification"):
        memory.estimate_memory("tiny", head="nope")


def test_a_module_naming_no_head_is_refused():
    with pytest.raises(TypeError, match="task='nope' names no head"):
        type("Bad", (Phi3LightningModule,), {"task": "nope"})
