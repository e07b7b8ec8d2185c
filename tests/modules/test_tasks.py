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


def test_every_data_module_names_a_task_of_the_registry():
    from phi3_lightning.data import CausalLMDataModule, SequenceClassificationDataModule, TokenClassificationDataModule

    data = {dm.task: dm for dm in (CausalLMDataModule, SequenceClassificationDataModule, TokenClassificationDataModule)}
    assert set(data) == set(MODULES)


@pytest.mark.parametrize(
    ("module_task", "data_task"),
    [
        ("causal_lm", "token_classification"),
        ("causal_lm", "sequence_classification"),
        ("sequence_classification", "causal_lm"),
    ],
)
def test_a_data_module_of_another_task_is_refused_before_training(module_task, data_task, tmp_path):
    """A causal LM fed token-classification batches trained without a word (tag ids read as next-token ids: silently
    wrong numbers); fed sequence-classification batches it crashed with an IndexError; a classifier fed causal-LM
    batches blamed num_labels. One line names both classes and what to change."""
    import lightning.pytorch as pl

    from phi3_lightning.data import CausalLMDataModule, SequenceClassificationDataModule, TokenClassificationDataModule

    data_classes = {
        "causal_lm": CausalLMDataModule,
        "sequence_classification": SequenceClassificationDataModule,
        "token_classification": TokenClassificationDataModule,
    }
    model = MODULES[module_task](model="tiny", **({} if module_task == "causal_lm" else {"num_labels": 8}))
    dm = data_classes[data_task](max_length=32, batch_size=2, cache_dir=str(tmp_path), progress=False)
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    with pytest.raises(ValueError) as e:
        trainer.fit(model, dm)
    message = str(e.value)
    assert f"{type(dm).__name__} makes {data_task} batches" in message, message
    assert f"{type(model).__name__} trains {module_task}" in message, message
    assert data_classes[module_task].__name__ in message and MODULES[data_task].__name__ in message, message
    assert model.head is None or trainer.global_step == 0  # refused before any step
