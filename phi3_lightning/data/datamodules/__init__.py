"""LightningDataModules feeding the three heads: causal LM, sequence classification, token classification.

Each one takes plain typed constructor arguments (LightningCLI exposes them as ``--data.*``, with the ``Args:``
docstrings as help), loads its tokenizer at construction, and after ``setup()`` serves batches that follow the
batch convention of ``collate.py``. All of them default to the embedded stdlib datasets (``embedded.py``), so they
work on a fresh machine with no download.

Attributes (available right after ``__init__``; the label ones are read lazily from the data when not given):

* ``tokenizer``, ``vocab_size``, ``pad_token_id``;
* classification modules: ``num_labels``, ``label_names``, ``problem_type``
  (``"single_label_classification"`` / ``"multi_label_classification"`` / ``"regression"``);
* after ``setup()``: ``datasets`` (split -> dataset), ``efficiency`` (split -> fraction of real tokens per
  batch slot; causal LM: of the packed rows).

The predict dataloader serves the test split in order, and its batches carry ``index`` (B,), the position of each
item in that split. For the classification modules an item is one record: ``predict_record(i)`` gives it back and
``decode_predictions(index, predictions)`` names the predictions with ``label_names``. (For the causal LM an item is a
packed row or a chunk of a document.)
"""

from .base import ExampleDataset as ExampleDataset  # re-exported: data.datamodules.ExampleDataset
from .causal_lm import CausalLMDataModule
from .labels import PROBLEM_TYPES
from .sequence_classification import SequenceClassificationDataModule
from .token_classification import TokenClassificationDataModule

__all__ = [
    "CausalLMDataModule",
    "SequenceClassificationDataModule",
    "TokenClassificationDataModule",
    "PROBLEM_TYPES",
]
