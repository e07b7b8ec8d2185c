"""The shared LightningModule of the three Phi-3 heads.

What lives here (and not in the head modules):

* building the backbone + head from a preset name, a :class:`Phi3Config`, or a Hugging Face checkpoint directory
  (backbone weights go into any head; a head of another shape is an error unless ``strict_head=False``);
* ``configure_model``: activation checkpointing per decoder layer, ``torch.compile`` (per layer or whole model),
  and FSDP2 (``fully_shard`` per decoder layer + root) when Lightning's ``ModelParallelStrategy`` supplies a device
  mesh. Under FSDP2 on GPU the model is built on the meta device, sharded, then materialised shard by shard with
  each module's ``reset_parameters()``; pretrained weights are read on rank 0 and broadcast into the shards;
* optimizer + LR scheduler from YAML (LightningCLI callable injection), weight decay on matrices only;
* the vocabulary check (tokenizer ids must fit the embedding) before anything is built;
* a ``phi3_lightning`` entry in every checkpoint (config, head, tokenizer) so ``generate``/``export`` can rebuild
  the model without the original YAML;
* the training metrics' states of the epoch in progress in every resumable checkpoint (:mod:`.metric_states`), so a
  run resumed mid-epoch logs the uninterrupted run's ``train/*_epoch`` values.

Checkpoint state-dict keys are ``head.<transformers key>`` (``head.model.layers.0.self_attn.qkv_proj.weight``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import warnings
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric

from ..memory import as_checkpoint_every
from ..model import DEFAULT_BACKEND, Phi3Config, check_backend, resolve_model
from ..model.fused import check_fused_kernels
from ..model.heads import HEADS, Phi3PreTrainedHead
from ..model.lora import LoRAConfig, apply_lora, as_lora_config
from .fsdp import broadcast_pretrained, materialize_meta, shard
from .metric_states import FORMAT as METRIC_STATES_FORMAT
from .metric_states import TRAIN_METRICS_KEY, collect, restore
from .schedulers import WarmupDecayLR
from .strategies import use_safe_checkpoint_io

COMPILE_SCOPES = ("layers", "model")
CHECKPOINT_KEY = "phi3_lightning"
# Wrapper segments that FSDP1 / compile / checkpoint wrappers insert into parameter names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


class LossMean(MeanMetric):
    """Weighted mean of per-batch mean losses that keeps NaN/inf: one non-finite batch makes the epoch's value NaN.

    torchmetrics' ``MeanMetric`` drops NaN values with a warning by default (and its ``nan_strategy="disable"``
    ignores the weights), so a model that gives NaN on part of the validation set would report the mean of the other
    batches and could be kept as the best checkpoint. A batch with weight 0 (no counted target: its mean loss is 0/0)
    adds nothing."""

    def update(self, value: Any, weight: Any = 1.0) -> None:
        value = torch.as_tensor(value, dtype=self.dtype, device=self.device).flatten()
        weight = torch.broadcast_to(torch.as_tensor(weight, dtype=self.dtype, device=self.device), value.shape)
        self.mean_value += (torch.where(weight == 0, torch.zeros_like(value), value) * weight).sum()
        self.weight += weight.sum()


def _all_reduce(t: torch.Tensor, op: Any) -> torch.Tensor:
    """In-place all-reduce over every process (no barrier around it, unlike ``strategy.reduce``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=op)
    return t


def _lora_settings(cfg: LoRAConfig) -> dict[str, Any]:
    """A LoRAConfig's fields for comparison; the order of the module lists does not matter."""
    out = dataclasses.asdict(cfg)
    for key in ("target_modules", "modules_to_save", "layers"):
        if out[key] is not None:
            out[key] = sorted(out[key])
    out["alpha"] = float(out["alpha"])
    out["dropout"] = float(out["dropout"])
    return out


def clean_param_name(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


class Phi3LightningModule(pl.LightningModule):
    """Base class: a Phi-3 backbone + one head (``self.head``), built in ``configure_model``.

    Subclasses set ``task`` (a key of :data:`phi3_lightning.model.heads.HEADS`, which gives ``head_class``) and
    implement ``_shared_step`` (loss + metric updates) and
    ``prediction_rows`` (what ``predict`` writes).

    Args:
        model: a preset name (``tiny``, ``phi-3-mini-4k`` ...), a Hugging Face checkpoint directory (config.json +
            safetensors: its backbone, and its head when shapes match, are loaded), a ``config.json`` path
            (architecture only, random init) or a Phi3Config.
        config_overrides: Phi3Config fields replaced on top of ``model`` (e.g. ``{num_hidden_layers: 4}``).
        attn_implementation: attention backend: ``eager``, ``sdpa``, ``flash_attention_2`` or ``flex``.
        optimizer: optimizer class and arguments (``class_path`` + ``init_args``); weight decay applies to matrices
            only (norm weights and biases get 0).
        lr_scheduler: LR scheduler (e.g. ``phi3_lightning.modules.WarmupDecayLR``: warmup + cosine/linear decay),
            stepped every optimizer step; null = constant learning rate.
        activation_checkpointing: recompute decoder layers in backward instead of keeping their activations:
            true = every layer (~30% more compute), n = every n-th layer (layers 0, n, 2n, ...: about 1/n of the
            saving for 1/n of the extra compute), ``selective`` = every layer keeps its matmul and attention outputs
            and recomputes only the elementwise ops (norms, RoPE, SiLU * up: no matmul runs twice; keeps more than
            true, far less than false; see ``model/selective_checkpoint.py``), false = none.
        torch_compile: ``layers`` (compile each decoder layer; works with FSDP2), ``model`` (the whole head) or
            null (eager).
        compile_mode: ``torch.compile`` mode (``default``, ``reduce-overhead``, ``max-autotune``).
        fused_kernels: fused RMSNorm / SwiGLU / RoPE kernels: ``compile`` (the package's own functions through
            ``torch.compile``; CPU and CUDA), ``liger`` (Liger Kernel's Triton ops; CUDA, ``pip install
            'phi3_lightning[liger]'``) or null (the eager modules). Same numbers within rounding; weights and
            checkpoints are unaffected.
        optimizer_in_backward: update each parameter inside backward as soon as its gradient is complete, then
            free that gradient (:mod:`.in_backward`): removes the gradients and the optimizer-step temporaries from
            the peak memory, same numbers and the same checkpoint format as the plain optimizer (a run may switch it
            on resume). One device only; not with gradient clipping, gradient accumulation or 16-mixed.
        meta_init: under FSDP2, build on the meta device and initialise each shard in place (null = on GPU yes,
            on CPU no: CPU builds the full model on every rank so the init equals a single-process one).
        strict_head: a checkpoint head (``lm_head``/``score``) of another shape is an error (true) or is
            re-initialised (false).
        lora: low-rank adapters (``{r: 16, alpha: 32, target_modules: [qkv_proj, o_proj, gate_up_proj, down_proj],
            layers: null, train_head: true}``): the named projections get adapters and everything else is frozen,
            except the new classification layers (``score``) with ``train_head``; only trainable parameters go to
            the optimizer. Applied right after the weights are loaded, before activation checkpointing, compile
            and FSDP2 sharding. ``export`` merges the adapters into a plain Hugging Face checkpoint. null = full
            fine-tuning.
        adapter: a LoRA adapter directory to continue training from (PEFT's layout: ``adapter_config.json`` +
            ``adapter_model.safetensors``, written by ``export --lora_only``, ``save_adapter`` or peft's
            ``save_pretrained`` on a Phi-3 checkpoint; this package's earlier adapter format loads too). Its
            settings (r, alpha, targets, rsLoRA, per-module ranks) replace ``lora`` (give one of the two); it is
            applied in ``configure_model`` after ``model``'s weights load. ``export`` merges it like any LoRA run.
    """

    head_class: ClassVar[type[Phi3PreTrainedHead]]
    task: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.task:
            if cls.task not in HEADS:
                raise TypeError(f"{cls.__name__}.task={cls.task!r} names no head; tasks: {', '.join(HEADS)}")
            cls.head_class = HEADS[cls.task]

    _hparams_ignore: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: str | Phi3Config = "tiny",
        config_overrides: dict[str, Any] | None = None,
        attn_implementation: str = DEFAULT_BACKEND,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        activation_checkpointing: bool | int | Literal["selective"] = False,
        torch_compile: str | None = None,
        compile_mode: str | None = None,
        fused_kernels: str | None = None,
        optimizer_in_backward: bool = False,
        meta_init: bool | None = None,
        strict_head: bool = True,
        lora: LoRAConfig | None = None,
        adapter: str | None = None,
        _head_overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_backend(attn_implementation, runnable=False)  # whether it runs is checked where the model is built
        if torch_compile not in (None, *COMPILE_SCOPES):
            raise ValueError(f"torch_compile={torch_compile!r}; use 'layers', 'model' or null")
        self._overrides = {**(config_overrides or {}), **(_head_overrides or {})}
        self.config, self.weights_dir = resolve_model(model, self._overrides)
        # the name and the activation now; whether the set runs here (liger: CUDA) where the model is built
        check_fused_kernels(fused_kernels, hidden_act=self.config.hidden_act, runnable=False)
        self.attn_implementation = attn_implementation
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        as_checkpoint_every(activation_checkpointing)  # a ValueError naming the value and the choices
        if activation_checkpointing == "selective" and torch_compile == "model":
            raise ValueError(
                "activation_checkpointing='selective' with torch_compile='model' is not supported (the whole-model "
                "graph breaks inside the checkpointed layers, where the selective policy cannot be traced); use "
                "torch_compile: layers (the checkpointed layer call is compiled) or activation_checkpointing: true"
            )
        self.activation_checkpointing = activation_checkpointing
        self.torch_compile = torch_compile
        self.compile_mode = compile_mode
        self.fused_kernels = fused_kernels
        self.optimizer_in_backward = bool(optimizer_in_backward)
        self.meta_init = meta_init
        self.strict_head = strict_head
        self.lora = as_lora_config(lora)
        if adapter is not None and self.lora is not None:
            raise ValueError(
                f"give either lora or adapter, not both: the adapter {str(adapter)!r} carries its own LoRA settings "
                "(r, alpha, target_modules) in its adapter_config.json; drop model.init_args.lora"
            )
        self.adapter = str(adapter) if adapter is not None else None
        if self.adapter is not None:
            from ..model.peft_format import read_adapter_config

            read_adapter_config(self.adapter)  # a missing or unreadable adapter fails now, not after the data setup
        self.head: Phi3PreTrainedHead | None = None
        self._no_decay: set[str] = set()
        # Called here, in __init__, as Lightning expects: it records the init args of this __init__ and of the
        # subclass __init__s that called it (or, under LightningCLI, the arguments the CLI instantiated us with).
        self.save_hyperparameters(ignore=["_head_overrides", *self._hparams_ignore])
        self._plain_hparams()

    # ------------------------------------------------------------------ hyper-parameters
    def _plain_hparams(self) -> None:
        """Keep plain data only in the saved hyper-parameters, so checkpoints load with ``weights_only=True`` (a
        Phi3Config is stored as its dict; optimizer classes given in Python are dropped), and only real init
        arguments."""
        if self._overrides:
            # label facts linked from the data module live in the config (num_labels, id2label, problem_type):
            # stored once, under config_overrides, so they never clash with the data module's own hparams.
            self.hparams["config_overrides"] = dict(self._overrides)
        accepted = set()
        for cls in type(self).__mro__:
            if cls is Phi3LightningModule or (isinstance(cls, type) and issubclass(cls, Phi3LightningModule)):
                accepted |= set(inspect.signature(cls.__init__).parameters)
        drop = []
        for key, value in list(self.hparams.items()):
            if key not in accepted and not key.startswith("_"):
                # e.g. the CLI's links record num_labels=None for a causal LM; LightningCLI re-parses the hparams of
                # a --ckpt_path as init arguments, so only real ones may stay.
                drop.append(key)
            elif isinstance(value, Phi3Config):
                self.hparams[key] = value.to_dict()
            elif key == "lora" and self.lora is not None:  # a LoRAConfig or a partial dict: every field, plain
                self.hparams[key] = dataclasses.asdict(self.lora)
            elif not _is_plain(value):
                drop.append(key)
        for key in drop:
            del self.hparams[key]
        self._hparams_initial = dict(self.hparams)

    # ------------------------------------------------------------------ building
    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def _head_kwargs(self) -> dict[str, Any]:
        return {}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (6N + attention) from the config's analytic count; classification heads
        replace the vocab-sized lm_head term by their small score layer."""
        flops = self.config.flops_per_token(seq_len)
        if self.task != "causal_lm":
            flops -= 6.0 * (self.config.vocab_size - self.config.num_labels) * self.config.hidden_size
        return flops

    def setup(self, stage: str) -> None:
        """Check that the data fits the model before anything is built or trained: the tokenizer's ids fit the
        embedding, and the row length (``max_length``) fits the positions (the one place this is checked). Lightning
        reads a ``ckpt_path`` after this hook: the Trainer gets the safe checkpoint loader first, so a plain
        ``pl.Trainer`` of the Python API never unpickles without ``weights_only`` either."""
        use_safe_checkpoint_io(self._trainer)
        dm = self._trainer.datamodule if self._trainer is not None else None
        data_task = getattr(dm, "task", None)
        if isinstance(data_task, str) and data_task and data_task != self.task:
            raise ValueError(self._other_task_message(dm, data_task))
        tokenizer = getattr(dm, "tokenizer", None)
        if tokenizer is not None:
            from ..data.tokenizer import check_vocab_fits

            check_vocab_fits(tokenizer, self.config.vocab_size)
        max_length, positions = getattr(dm, "max_length", None), self.config.max_position_embeddings
        if isinstance(max_length, int) and max_length > positions:
            raise ValueError(
                f"max_length={max_length} (the data's row length) exceeds max_position_embeddings={positions} of the "
                "model; lower --data.max_length or use a long-context (128k) checkpoint"
            )

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, weights_only: bool | None = None, **kwargs: Any):
        """Lightning's ``load_from_checkpoint``, the file read only by the safe loader of :mod:`.safe_load`
        (``weights_only=True`` and nothing else; a crafted file is an :class:`~.safe_load.UnsafeCheckpointError`).
        Asking for ``weights_only`` False is refused."""
        if weights_only is False:
            raise ValueError(
                "weights_only set to False would unpickle the checkpoint without restrictions (a crafted file runs "
                "code while it loads); phi3_lightning loads checkpoints with weights_only=True only: drop the argument"
            )
        from unittest import mock

        from lightning.pytorch.core import saving

        from .safe_load import load_checkpoint_file

        lightning_load = saving.pl_load

        def safe_load(path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
            if isinstance(path, (str, os.PathLike)) and "://" not in str(path):
                return load_checkpoint_file(path, map_location=map_location if map_location is not None else "cpu")
            return lightning_load(path, map_location=map_location, weights_only=True)  # a URL or an open file

        with mock.patch.object(saving, "pl_load", safe_load):
            return super().load_from_checkpoint(checkpoint_path, *args, weights_only=True, **kwargs)

    def _other_task_message(self, dm: Any, data_task: str) -> str:
        from ..data import CausalLMDataModule, SequenceClassificationDataModule, TokenClassificationDataModule
        from .tasks import MODULES

        data_for = {
            c.task: c.__name__
            for c in (CausalLMDataModule, SequenceClassificationDataModule, TokenClassificationDataModule)
        }
        other = MODULES[data_task].__name__ if data_task in MODULES else f"the {data_task} LightningModule"
        return (
            f"the data module {type(dm).__name__} makes {data_task} batches, but the model {type(self).__name__} "
            f"trains {self.task}; give it {data_for.get(self.task, f'{self.task} data')} (--data), or train "
            f"{data_task} with {other} (--model), e.g. with configs/{data_task}.yaml"
        )

    def configure_model(self) -> None:
        if self.head is not None:
            return
        trainer = self._trainer
        mesh = getattr(self, "_device_mesh", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        resuming = trainer is not None and trainer.ckpt_path is not None
        load_weights = self.weights_dir is not None and not resuming
        meta = mesh is not None and (self.meta_init if self.meta_init is not None else device.type != "cpu")
        if self.meta_init and mesh is None:
            warnings.warn("meta_init applies under FSDP2 (ModelParallelStrategy) only; building normally", stacklevel=2)
        if meta and device.type == "cpu" and not load_weights:
            warnings.warn(
                "meta_init on CPU: DTensor random ops have no per-shard RNG on CPU, so every shard gets the same random "
                "values; leave meta_init null on CPU for an init equal to a single-process run",
                stacklevel=2,
            )
        if mesh is not None and self.torch_compile == "model":
            raise ValueError(
                "torch_compile='model' cannot be combined with FSDP2 sharding; use torch_compile: layers "
                "(each decoder layer compiled, then sharded)"
            )
        if mesh is not None and self.torch_compile == "layers" and self.activation_checkpointing == "selective":
            # selective + compile traces the checkpointed layer call as one function around the layer module, which
            # FSDP2's per-layer hooks would sit inside; not checked to give FSDP2's numbers, so not offered
            raise ValueError(
                "activation_checkpointing='selective' with torch_compile='layers' is not supported under FSDP2 "
                "sharding; use selective checkpointing without compile, or activation_checkpointing: true with "
                "torch_compile: layers"
            )
        kwargs = self._head_kwargs()
        dtype = torch.get_default_dtype()  # bf16 under precision 'bf16-true'
        if meta:
            with torch.device("meta"):
                head = self.head_class(self.config, self.attn_implementation, device=torch.device("meta"), **kwargs)
        elif load_weights:
            head = self._load_pretrained(device=None, dtype=dtype)
        else:
            head = self.head_class(self.config, self.attn_implementation, **kwargs)
        if self.adapter is not None:
            # The adapter's weights load now when the base weights just did; a resumed run's checkpoint (or, on the
            # meta device, the broadcast from rank 0's _load_full_pretrained) supplies them otherwise.
            if meta and not load_weights and not resuming:
                raise ValueError(
                    f"adapter {self.adapter!r} with meta_init needs pretrained base weights: set model to the Phi-3 "
                    "checkpoint directory the adapter was trained on"
                )
            from ..model.peft_format import load_adapter

            self.lora = load_adapter(head, self.adapter, weights=load_weights and not meta)
            self._log_lora(head)
        elif self.lora is not None:
            # Before checkpointing / compile / sharding, so they see the final module tree. On the meta device the
            # adapters get their init (A kaiming, B = 0) from LoRALinear.reset_parameters in materialize_meta.
            apply_lora(head, self.lora)
            self._log_lora(head)
        self._no_decay = {n for n, p in head.named_parameters() if p.ndim < 2}
        if self.fused_kernels is not None:
            check_fused_kernels(self.fused_kernels, device=device)  # liger on a CPU run: said before any step
            head.set_fused_kernels(self.fused_kernels)  # before compile: the compiled layers trace the fused path
        selective = self.activation_checkpointing == "selective"
        if selective:
            head.gradient_checkpointing_enable(selective=True)
        elif self.activation_checkpointing:
            head.gradient_checkpointing_enable(int(self.activation_checkpointing))
        if self.torch_compile == "layers":
            if selective:  # a compiled layer inside an eager selective checkpoint would be recomputed whole
                head.model.compile_selective_layers(self.compile_mode)
            else:
                for layer in head.model.layers:
                    layer.compile(mode=self.compile_mode)
        if mesh is not None:
            shard(head, mesh)
            if meta:
                materialize_meta(head, device)
                if load_weights:  # rank 0 reads the checkpoint, every rank receives its shards
                    broadcast_pretrained(head, self._load_full_pretrained if self.global_rank == 0 else None)
        elif self.torch_compile == "model":
            head.compile(mode=self.compile_mode)
        self.head = head

    def _load_pretrained(self, device=None, dtype=None) -> Phi3PreTrainedHead:
        rank_zero_info(f"loading weights from {self.weights_dir}")
        head = self.head_class.from_pretrained(
            self.weights_dir,
            attn_implementation=self.attn_implementation,
            dtype=dtype,
            device=device,
            strict_head=self.strict_head,
            **self._overrides,
            **self._head_kwargs(),
        )
        self.config = head.config  # from_pretrained unties a tie_word_embeddings checkpoint whose lm_head differs
        return head

    def _load_full_pretrained(self) -> Phi3PreTrainedHead:
        """The whole pretrained head on the CPU, adapted like the sharded one (same keys; rank 0's adapters go to
        every rank)."""
        src = self._load_pretrained(device="cpu", dtype=torch.get_default_dtype())
        if self.adapter is not None:
            from ..model.peft_format import load_adapter

            load_adapter(src, self.adapter)
        elif self.lora is not None:
            apply_lora(src, self.lora)
        return src

    @staticmethod
    def _log_lora(head: nn.Module) -> None:
        total = sum(p.numel() for p in head.parameters())
        trained = sum(p.numel() for p in head.parameters() if p.requires_grad)
        full = getattr(head, "lora_modules_to_save", [])
        rank_zero_info(
            f"LoRA: training {trained:,} of {total:,} parameters ({100 * trained / max(total, 1):.2f} %)"
            + (f"; trained in full: {', '.join(full)}" if full else "")
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After every callback's ``on_train_batch_end``: the batch that reaches ``max_steps`` saves ``last.ckpt``
        before Lightning closes the epoch."""
        self._save_at_max_steps(after_validation=False)

    def on_validation_end(self) -> None:
        """After every callback's ``on_validation_end`` (ModelCheckpoint's saves): the validation that follows the
        ``max_steps`` batch saves ``last.ckpt`` when no ModelCheckpoint did."""
        self._save_at_max_steps(after_validation=True)

    def _save_at_max_steps(self, after_validation: bool) -> None:
        """:meth:`.guards.PreemptionCheckpoint.save_at_max_steps` of the run's PreemptionCheckpoint."""
        from .guards import PreemptionCheckpoint

        trainer = self._trainer
        for cb in trainer.callbacks if trainer is not None else ():
            if isinstance(cb, PreemptionCheckpoint):
                cb.save_at_max_steps(trainer, after_validation=after_validation)

    def configure_callbacks(self) -> list[pl.Callback]:
        """Always on: a CUDA out-of-memory error gets the memory planner's estimate and advice appended; a
        non-finite loss / gradient / weight stops fit before the update and is never checkpointed; SIGTERM / Ctrl-C
        during fit save a resumable last.ckpt and exit non-zero (see :mod:`.guards`)."""
        from .guards import NonFiniteGuard, PreemptionCheckpoint
        from .oom import OOMAdvice

        return [OOMAdvice(), NonFiniteGuard(), PreemptionCheckpoint()]

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, torch.Tensor], **kwargs: Any):
        assert self.head is not None, "call configure_model() first (the Trainer does)"
        return self.head(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            labels=batch.get("labels"),
            **kwargs,
        )

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        span = self.__dict__.get("_train_span")
        if span is not None:
            span[2] = batch_idx + 1  # the train metrics now hold batches [first, batch_idx] of this epoch
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val", dataloader_idx)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test", dataloader_idx)

    # ------------------------------------------------------------------ distributed evaluation
    def on_validation_epoch_start(self) -> None:
        self._eval_repeats = self._repeats_per_loader(self.trainer.val_dataloaders)

    def on_test_epoch_start(self) -> None:
        self._eval_repeats = self._repeats_per_loader(self.trainer.test_dataloaders)

    @classmethod
    def _repeats_per_loader(cls, loaders: Any) -> list[torch.Tensor | None]:
        """:meth:`_repeated_indices` of every val / test dataloader, in Lightning's ``dataloader_idx`` order."""
        from lightning.pytorch.utilities import CombinedLoader

        if loaders is None:
            return []
        return [cls._repeated_indices(loader) for loader in CombinedLoader(loaders, "sequential").flattened]

    @staticmethod
    def _repeated_indices(loader: Any) -> torch.Tensor | None:
        """Dataset indices that this process sees only as the padding of a ``DistributedSampler`` (one dataloader).

        Lightning gives every process of a multi-process val / test run a ``DistributedSampler`` that pads the split
        to a multiple of the process count by repeating examples, so that all processes run the same number of
        batches (which sharded models need). The sampler lays positions out as ``rank, rank + W, rank + 2W, ...`` of
        the padded list; a position at or past the dataset's length is a repeat. Its index occurs nowhere else on
        this process (its own copy sits on another rank), so it can be recognised by the batch's ``index``."""
        from torch.utils.data import DistributedSampler

        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, DistributedSampler):
            sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
        if not isinstance(sampler, DistributedSampler):
            return None
        n, world, rank = len(sampler.dataset), sampler.num_replicas, sampler.rank
        if n < world:
            # a process would see repeats only, log no metric, and leave the others waiting in the epoch-end sync
            raise ValueError(
                f"this evaluation split has {n} example(s) for {world} processes: every process needs at least one "
                "of its own; evaluate on one process (--trainer.devices 1) or give the split more examples"
            )
        repeats = [i for p, i in enumerate(sampler) if p * world + rank >= n]
        return torch.tensor(repeats, dtype=torch.long) if repeats else None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Val / test: the rows of a batch that are the distributed sampler's repeats (see :meth:`_repeated_indices`)
        are dropped here, while the batch is still on the host, so deciding costs no device sync (see
        :meth:`_screen_repeats`)."""
        self.__dict__.pop("_screened", None)
        trainer = self._trainer
        if trainer is None or not (trainer.validating or trainer.testing or trainer.sanity_checking):
            return batch
        batch, self.__dict__["_screened"] = self._screen_repeats(batch, dataloader_idx)
        return batch

    def _screen_repeats(self, batch: Any, dataloader_idx: int) -> tuple[Any, bool]:
        """``(batch without the distributed sampler's repeated rows, whether it held repeats only)``. A batch of
        repeats only is kept whole: its step still runs the model (the processes stay in step) but counts nothing."""
        repeats = getattr(self, "_eval_repeats", [])
        index = batch.get("index") if isinstance(batch, dict) else None
        if dataloader_idx >= len(repeats) or repeats[dataloader_idx] is None or not isinstance(index, torch.Tensor):
            return batch, False
        counted = ~torch.isin(index, repeats[dataloader_idx].to(index.device))
        if bool(counted.all()):
            return batch, False
        if bool(counted.any()):
            return {k: v[counted] for k, v in batch.items()}, False
        return batch, True

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, dataloader_idx: int = 0) -> None:
        """``_shared_step`` into the metrics of dataloader ``dataloader_idx`` (see :meth:`stage_metrics`) on the rows
        that count, so a multi-process val/test result equals the single-process one. The repeats are normally
        dropped on the host by :meth:`on_before_batch_transfer`; when it did not run for this batch (Lightning calls
        a LightningDataModule's own ``on_before_batch_transfer`` instead of the module's), they are dropped here, on
        the device (one sync per batch)."""
        self._eval_dataloader_idx = dataloader_idx
        uncounted = self.__dict__.pop("_screened", None)
        if uncounted is None:
            batch, uncounted = self._screen_repeats(batch, dataloader_idx)
        if uncounted:
            with torch.no_grad():
                self(batch)
            return
        self._shared_step(batch, stage)

    def _log_metrics(self, stage: str, metrics: dict[str, Any], batch_size: int) -> None:
        """Log torchmetrics objects (already updated): train per step and per epoch (``train/x_step``,
        ``train/x_epoch``), val/test per epoch (``val/x``). torchmetrics syncs them across processes."""
        train = stage == "train"
        # the metric's attribute path, given rather than looked up: Lightning's lookup table is built once, before
        # the metric set of a further dataloader exists
        prefix = self._metric_set_name(stage, self._metric_loader(stage))
        for name, metric in metrics.items():
            self.log(
                f"{stage}/{name}",
                metric,
                on_step=train,
                on_epoch=True,
                prog_bar=name in ("loss", "accuracy"),
                batch_size=batch_size,
                metric_attribute=f"{prefix}.{name}",
            )

    def _register_metrics(self, factory) -> None:
        """One fresh metric set per stage: ``train_metrics``, ``val_metrics``, ``test_metrics``. A val / test run
        with several dataloaders gets one more set per further loader (``val_metrics_1``, ...), made by the same
        ``factory`` when that loader's first batch comes (see :meth:`stage_metrics`)."""
        self.__dict__["_metric_factory"] = factory  # a plain attribute: not a module, no state_dict entry
        for name in [n for n in self._modules if n.startswith(("val_metrics_", "test_metrics_"))]:
            delattr(self, name)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_metrics", factory())

    @staticmethod
    def _metric_set_name(stage: str, dataloader_idx: int) -> str:
        return f"{stage}_metrics" if dataloader_idx == 0 else f"{stage}_metrics_{dataloader_idx}"

    def stage_metrics(self, stage: str, dataloader_idx: int | None = None) -> nn.ModuleDict:
        """The metric set of ``stage``; for val / test that of one dataloader (``dataloader_idx``, by default the one
        being evaluated), so that with several loaders each reports its own examples only."""
        name = self._metric_set_name(stage, self._metric_loader(stage, dataloader_idx))
        if name not in self._modules:
            setattr(self, name, self._metric_factory().to(self.device))
        return getattr(self, name)

    def _metric_loader(self, stage: str, dataloader_idx: int | None = None) -> int:
        if stage == "train":
            return 0
        return getattr(self, "_eval_dataloader_idx", 0) if dataloader_idx is None else dataloader_idx

    def _update(self, metric, stage: str, *args: Any, **kwargs: Any) -> None:
        """Train: ``forward`` (gives the step value and accumulates); val/test: ``update`` only.

        Under gradient accumulation the step value (``train/x_step``, which Lightning logs at the optimizer step's
        last batch) is the metric over all the batches of that optimizer step, not over its last batch alone."""
        if stage != "train":
            metric.update(*args, **kwargs)
            return
        pending = self.__dict__.pop("_train_states_to_restore", None)
        if pending is not None:  # the first update after a mid-epoch resume (after the head settled its metric set)
            self._restore_train_metrics(pending)
        metric(*args, **kwargs)
        trainer = self._trainer
        if trainer is None or getattr(trainer, "accumulate_grad_batches", 1) <= 1:
            return
        windows = self.__dict__.setdefault("_step_windows", {})  # a plain dict: no module, no state_dict entry
        step, window = windows.get(id(metric), (None, None))
        if window is None:
            window = metric.clone()
            window.sync_on_compute = False  # this process's batches, like the step value Lightning logs
        if step != trainer.global_step:
            window.reset()
        window.update(*args, **kwargs)
        windows[id(metric)] = (trainer.global_step, window)
        metric._forward_cache = window.compute()  # the value Lightning logs for the step (see its ResultMetric)

    # ------------------------------------------------------------------ token-exact loss of an optimizer step
    def _token_exact(self) -> bool:
        """Whether an optimizer step spans several micro-batches or processes, so that the mean of per-batch means
        that Lightning (÷ accumulate_grad_batches) and DDP / FSDP (÷ world size) would take differs from the mean
        over the step's counted units. One micro-batch on one process (and ``optimizer_in_backward``, which allows
        only that) keeps the plain mean: nothing to correct, and the numbers stay bit for bit those of before."""
        trainer = self._trainer
        if trainer is None or not self.automatic_optimization or self.optimizer_in_backward:
            return False
        if trainer.strategy.handles_gradient_accumulation:  # DeepSpeed scales by itself; left as it was
            return False
        return trainer.accumulate_grad_batches > 1 or trainer.world_size > 1

    def _training_objective(self, stage: str, loss: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate for a batch whose ``loss`` is the mean over its ``units`` counted units
        (target tokens of a causal LM, labelled tokens, examples).

        Under gradient accumulation or several processes it is ``loss * units / c``: the batch's *sum*, over a scale
        ``c`` that is the same for every micro-batch of the optimizer step on every process (the largest count of
        the step's first micro-batches, a scalar all-reduce at the step's first micro-batch; the values then stay of the
        usual size, which matters to float16's range).
        :meth:`optimizer_step` then multiplies the gradients by ``c * accumulate_grad_batches * world_size / N``,
        N = the counted units of all the step's micro-batches on all processes (a scalar all-reduce), which undoes
        Lightning's ÷ accumulate_grad_batches and DDP / FSDP's averaging: the step's gradient is that of the mean
        loss over all its N units, however they were split into micro-batches and processes."""
        if stage != "train" or not self._token_exact():
            return loss
        units = units.detach().to(device=loss.device, dtype=torch.float32).reshape(())
        state = self.__dict__.setdefault("_step_units", {})  # plain dict: no module, no state_dict entry
        if state.get("sum") is None:  # the first micro-batch of this optimizer step
            scale = units.clamp(min=1.0)
            if self.trainer.world_size > 1:
                scale = _all_reduce(scale, torch.distributed.ReduceOp.MAX)
            state["scale"], state["sum"] = scale, torch.zeros_like(units)
        state["sum"] = state["sum"] + units
        # a micro-batch without counted units (its mean loss is 0/0 = NaN) adds nothing to the step's sum, as its rows
        # add nothing to one batch holding the whole step; chosen on the device (no host sync). A step with no unit at
        # all is stopped by the guard (see _rescale_gradients)
        objective = loss * (units / state["scale"]).to(loss.dtype)
        return torch.where(units > 0, objective, torch.zeros_like(objective))

    def on_train_epoch_start(self) -> None:
        # Lightning steps at an epoch's end even inside an accumulation window: a new epoch starts a new step
        self.__dict__["_step_units"] = {}

    # ------------------------------------------------------------------ train metrics across a resume
    # The train metrics' states go into every resumable checkpoint with the batches they cover, ``_train_span`` =
    # [epoch, first, next): batches first .. next - 1 of that epoch (see :mod:`.metric_states`). Plain attributes in
    # __dict__: no module, no state_dict entry.
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._check_saved_train_metrics(batch_idx)
        self.__dict__["_epoch_end_metrics"] = None  # the live states are this epoch's again
        span = self.__dict__.get("_train_span")
        if span is None or span[0] != self.current_epoch or span[2] != batch_idx:
            self.__dict__["_train_span"] = [self.current_epoch, batch_idx, batch_idx]

    def on_train_epoch_end(self) -> None:
        # Lightning logs the train metrics right after this hook and then resets them: a checkpoint written later in
        # this fit (PreemptionCheckpoint.on_train_end) saves this copy; it holds a finished epoch, which a resume
        # does not restore into the next one (a max_steps stop mid-epoch saves before the epoch closes)
        if hasattr(self, "train_metrics"):
            self.__dict__["_epoch_end_metrics"] = {n: m.clone() for n, m in self.stage_metrics("train").items()}

    def _train_metric_entry(self) -> dict[str, Any] | None:
        span = self.__dict__.get("_train_span")
        if span is None or not hasattr(self, "train_metrics"):
            return None
        metrics = self.__dict__.get("_epoch_end_metrics") or dict(self.stage_metrics("train").items())
        world = self._trainer.world_size if self._trainer is not None else 1
        states, refused = collect(metrics, world, lambda t: _all_reduce(t, torch.distributed.ReduceOp.SUM))
        if refused and not self.__dict__.get("_warned_refused"):
            self.__dict__["_warned_refused"] = True
            rank_zero_warn(
                f"train metric(s) {', '.join(refused)} have states that are not sums over processes, so their "
                f"{world}-process states cannot be saved exactly: a run resumed mid-epoch from this run's "
                "checkpoints logs their train/*_epoch over the batches after the resume only"
            )
        epoch, first, nxt = span
        return {
            "format": METRIC_STATES_FORMAT,
            "epoch": epoch,
            "first": first,
            "next": nxt,
            "world_size": world,
            "metrics": states,
            "refused": refused,
        }

    def _check_saved_train_metrics(self, batch_idx: int) -> None:
        """At the first training batch after a checkpoint was loaded: keep its train metric states for the first
        update if this run continues their epoch at the batch after theirs; drop them otherwise (a finished epoch's
        states, written at its last batch or its end, must not count in the next one)."""
        if "_saved_train_metrics" not in self.__dict__:
            return
        saved = self.__dict__.pop("_saved_train_metrics")
        epoch = self.current_epoch
        if saved is None:  # a checkpoint of an older version (or a weights-only one)
            if batch_idx > 0:
                rank_zero_info(
                    f"the checkpoint holds no train metric states (written before they were saved): train/*_epoch "
                    f"of epoch {epoch} covers batches {batch_idx}.. only, not the {batch_idx} before the resume"
                )
            return
        if not isinstance(saved, dict) or saved.get("format") != METRIC_STATES_FORMAT:
            found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
            rank_zero_warn(
                f"the checkpoint's train metric states have an unknown format ({found!r}; this version reads "
                f"{METRIC_STATES_FORMAT}): not restored, so train/*_epoch of epoch {epoch} covers batches "
                f"{batch_idx}.. only"
            )
            return
        if (saved["epoch"], saved["next"]) != (epoch, batch_idx):
            if saved["epoch"] != epoch and batch_idx > 0:
                rank_zero_warn(
                    f"the checkpoint was written after batch {saved['next'] - 1} of epoch {saved['epoch']}, but this "
                    f"run goes on with batch {batch_idx} of epoch {epoch}: Lightning counted epoch {saved['epoch']} as "
                    "finished (fit stopped by max_steps and saved at its end), so the rest of that epoch is not "
                    f"trained and train/*_epoch of epoch {epoch} covers batches {batch_idx}.. only"
                )
            elif saved["epoch"] == epoch:
                rank_zero_warn(
                    f"the checkpoint's train metric states cover batches {saved['first']}..{saved['next'] - 1} of "
                    f"epoch {epoch}, but this run continues at batch {batch_idx}: not restored, so train/*_epoch of "
                    f"epoch {epoch} covers batches {batch_idx}.. only"
                )
            return
        self.__dict__["_train_states_to_restore"] = saved
        self.__dict__["_train_span"] = [saved["epoch"], saved["first"], saved["next"]]

    def _restore_train_metrics(self, saved: dict[str, Any]) -> None:
        world = self._trainer.world_size if self._trainer is not None else 1
        skipped = restore(dict(self.stage_metrics("train").items()), saved["metrics"], world, self.global_rank)
        epoch, first, nxt = saved["epoch"], saved["first"], saved["next"]
        if skipped:
            rank_zero_warn(
                f"train metric(s) {', '.join(skipped)} were not restored from the checkpoint (not saved, or saved "
                f"another way: {', '.join(saved.get('refused') or []) or 'another metric class'}): their "
                f"train/*_epoch of epoch {epoch} covers batches {nxt}.. only"
            )
        if first > 0:
            rank_zero_info(
                f"train/*_epoch of epoch {epoch} covers batches {first}.. (the checkpoint's run was itself resumed at "
                f"batch {first} from a checkpoint without train metric states)"
            )

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, with the gradients rescaled (see :meth:`_training_objective`) right after the closure's
        backward: before the loss scaler unscales them (a linear factor either way), before the
        ``on_before_optimizer_step`` hooks (the :class:`~.guards.NonFiniteGuard`) and before gradient clipping."""
        if optimizer_closure is not None and self._token_exact():
            closure = optimizer_closure

            def optimizer_closure():
                result = closure()
                self._rescale_gradients(optimizer)
                return result

        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    @torch.no_grad()
    def _rescale_gradients(self, optimizer) -> None:
        state = self.__dict__.get("_step_units") or {}
        self.__dict__["_step_units"] = {}
        total, scale = state.get("sum"), state.get("scale")
        if total is None:  # no training_step counted anything (e.g. a module whose step skipped the objective)
            return
        trainer = self.trainer
        world = trainer.world_size
        if world > 1:
            total = _all_reduce(total.clone(), torch.distributed.ReduceOp.SUM)
        # N = 0 (no counted unit in the whole step): the factor is inf, the gradients NaN, and the guard stops the run
        # naming the cause (it reads the count kept here, on its failure path only)
        self.__dict__["_last_step_units"] = total
        factor = scale * float(trainer.accumulate_grad_batches * world) / total
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad
                    g = g.to_local() if hasattr(g, "to_local") else g  # a DTensor shard: scale its local part
                    by_device.setdefault(g.device, []).append(g)
        for device, grads in by_device.items():
            torch._foreach_mul_(grads, factor.to(device))

    # ------------------------------------------------------------------ predict
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> Any:
        raise NotImplementedError

    def prediction_rows(self, outputs: Any, datamodule: Any) -> list[dict[str, Any]]:
        """JSON-ready rows (one per example) of one predict batch's outputs."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self):
        assert self.head is not None
        decay, no_decay = [], []
        for name, p in self.head.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if clean_param_name(name) in self._no_decay else decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if self.optimizer_in_backward:
            from .in_backward import InBackwardOptimizer, check_in_backward_trainer

            check_in_backward_trainer(self.trainer, self.automatic_optimization)
            optimizer = InBackwardOptimizer(self.optimizer_factory, groups)
        else:
            optimizer = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupDecayLR):
            total = self.trainer.estimated_stepping_batches
            if total is not None and math.isfinite(total):
                scheduler.set_total_steps(int(total))
        # name: LearningRateMonitor logs train/lr/pg<N>, beside the other train/ cards (not a card group of its own)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return {
                "optimizer": optimizer,
                "lr_scheduler": {
                    "scheduler": scheduler,
                    "monitor": "val/loss",
                    "interval": "epoch",
                    "name": "train/lr",
                },
            }
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """FSDP1 shards gradients, so Lightning's norm clipping refuses it: clip through the FSDP root instead."""
        from lightning.pytorch.strategies import FSDPStrategy

        if (
            gradient_clip_val
            and isinstance(self.trainer.strategy, FSDPStrategy)
            and gradient_clip_algorithm in (None, "norm")
        ):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_info(self) -> dict[str, Any]:
        """What ``generate``/``export`` need to rebuild the model from a Lightning checkpoint alone."""
        dm = self._trainer.datamodule if self._trainer is not None else None
        info = {
            "task": self.task,
            "config": self.config.to_dict(),
            "attn_implementation": self.attn_implementation,
            "head_kwargs": self._head_kwargs(),
            "lora": dataclasses.asdict(self.lora) if self.lora is not None else None,
            "base_model": str(self.weights_dir) if self.weights_dir is not None else None,
        }
        spec = getattr(dm, "tokenizer_spec", None)
        if isinstance(spec, str):
            info["tokenizer"] = spec
        return info

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_info()
        if "loops" in checkpoint:  # a resumable checkpoint (a weights-only one resumes nothing)
            # every process gets here (Lightning's save_checkpoint), as the all-reduce of several processes needs
            entry = self._train_metric_entry()
            if entry is not None:
                checkpoint[TRAIN_METRICS_KEY] = entry

    def _check_checkpoint_lora(self, checkpoint: dict[str, Any]) -> None:
        """The LoRA settings the checkpoint's adapters were trained with must be this model's, before any weight is
        copied: another alpha / use_rslora / dropout fits the same tensors and would silently change the numbers.
        Checked here for every entry point (the CLI compares its arguments earlier; this also covers the Python API
        and a run started from ``adapter`` whose adapter_config.json was edited since)."""
        info = checkpoint.get(CHECKPOINT_KEY)
        if self.head is None or not isinstance(info, dict) or "lora" not in info:
            return
        saved = as_lora_config(info["lora"])
        if saved is None and self.lora is None:
            return
        source = f" (from adapter {self.adapter!r})" if self.adapter is not None else ""
        if saved is None:
            raise ValueError(
                f"the checkpoint was trained without LoRA (a full fine-tune), but this model has lora{source}; drop "
                "lora / adapter to load it, or start a LoRA run from its weights: export it, then fit with "
                "model set to the export (without the checkpoint)"
            )
        if self.lora is None:
            raise ValueError(
                f"the checkpoint was trained with LoRA (r={saved.r}, alpha={saved.alpha:g}, target_modules="
                f"{saved.target_modules}), but this model has lora=null; set lora to the checkpoint's settings "
                f"({dataclasses.asdict(saved)})"
            )
        old, new = _lora_settings(saved), _lora_settings(self.lora)
        diff = [k for k in old if old[k] != new[k]]
        if diff:
            shown = ", ".join(f"lora.{k}={old[k]!r} in the checkpoint but {new[k]!r} here" for k in diff)
            raise ValueError(
                f"the checkpoint's adapters were trained with other LoRA settings than this model's{source}: {shown}; "
                "its adapters only mean what they were trained to mean with the checkpoint's settings: use those"
                + (" (was the adapter directory changed since the run started?)" if source else "")
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint whose head has other shapes (e.g. num_labels) fails with a message saying which. Its train
        metric states are kept for the first training batch, which restores them if it continues their epoch."""
        self.__dict__["_saved_train_metrics"] = checkpoint.get(TRAIN_METRICS_KEY)
        self._check_checkpoint_lora(checkpoint)
        state = checkpoint.get("state_dict") or {}
        if self.head is None or not state:
            return
        own = self.state_dict()
        for key, tensor in state.items():
            if key in own and hasattr(tensor, "shape") and tuple(tensor.shape) != tuple(own[key].shape):
                hint = (
                    "num_labels / label names differ from the run that wrote it; use the same data labels"
                    if ".score." in key
                    else "the architecture (model / config_overrides) differs from the run that wrote it"
                )
                raise ValueError(
                    f"checkpoint tensor {key} has shape {tuple(tensor.shape)} but this model's is "
                    f"{tuple(own[key].shape)}: {hint}"
                )
