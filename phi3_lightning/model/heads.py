"""The three heads on the shared backbone: causal LM, sequence classification, token classification.

Every head holds the backbone as ``self.model`` so state-dict keys are those of transformers' ``Phi3For*``
classes (``model.layers.0.self_attn.qkv_proj.weight``, ``lm_head.weight``, ``score.weight``) and a checkpoint
trained with one head loads into another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbone import Phi3Model
from .backends import DEFAULT_BACKEND
from .checkpoint import PretrainedMixin
from .config import Phi3Config
from .linear import Linear
from .lora import linear_operands
from .loss import (
    IGNORE_INDEX,
    causal_lm_loss,
    check_causal_lm_labels,
    fused_linear_cross_entropy,
    sequence_classification_loss,
    shift_labels,
    token_classification_loss,
)


@dataclass
class ModelOutput:
    """What every head returns; attribute access like transformers' outputs."""

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # (B, T, hidden) final-normed backbone output
    cache: Any = None

    def __getitem__(self, key: str):
        return getattr(self, key)


def ignore_targets_after_padding(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """labels[t] is predicted from position t - 1; a padding position predicts nothing, so such targets are -100.

    (transformers would count them, with a value that depends on what a padding query attends to.)
    """
    if attention_mask.shape != labels.shape or bool(attention_mask.all()):
        return labels
    out = labels.clone()
    out[:, 1:] = out[:, 1:].masked_fill(attention_mask[:, :-1] == 0, IGNORE_INDEX)
    return out


class Phi3PreTrainedHead(PretrainedMixin, nn.Module):
    """Shared plumbing: backbone construction, backend switch, gradient checkpointing, init."""

    architecture = "Phi3Model"

    def __init__(
        self,
        config: Phi3Config,
        attn_implementation: str = DEFAULT_BACKEND,
        device: torch.device | None = None,
        fused_kernels: str | None = None,
    ):
        super().__init__()
        self.config = config
        self.model = Phi3Model(config, attn_implementation, device=device, fused_kernels=fused_kernels)

    @property
    def attn_implementation(self) -> str:
        return self.model.attn_implementation

    def set_attn_implementation(self, name: str) -> None:
        self.model.set_attn_implementation(name)

    @property
    def fused_kernels(self) -> str | None:
        return self.model.fused_kernels

    def set_fused_kernels(self, name: str | None) -> None:
        """Fused RMSNorm / SwiGLU / RoPE kernel set ``name`` (``compile``, ``liger``) or None (eager); see
        :mod:`~phi3_lightning.model.fused`."""
        self.model.set_fused_kernels(name)

    def gradient_checkpointing_enable(self, every: int = 1, selective: bool = False) -> None:
        """Recompute decoder layers in backward (non-reentrant) instead of keeping their activations: every layer
        (``every=1``: ~1/3 more compute, each layer keeps only its input), or layers 0, n, 2n, ... (``every=n``:
        about 1/n of both the saving and the extra compute). ``selective=True``: every layer keeps the outputs of
        its matmuls and attention kernel and recomputes only the elementwise ops (norms, RoPE, SiLU * up, casts):
        no matmul runs twice (:mod:`~phi3_lightning.model.selective_checkpoint`); ``every`` must then be 1."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"gradient checkpointing every={every!r}: give a whole number >= 1 (1 = every decoder layer, "
                "2 = every other layer, ...)"
            )
        if not isinstance(selective, bool):
            raise ValueError(f"gradient checkpointing selective={selective!r}: give true or false")
        if selective and every != 1:
            raise ValueError(
                f"selective checkpointing applies to every decoder layer, not every={every}: drop every (or use "
                "every=n without selective to recompute whole layers 0, n, 2n, ...)"
            )
        self.model.gradient_checkpointing = True
        self.model.checkpoint_every = every
        self.model.checkpoint_selective = selective

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and m is not self.model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self.tie_weights()

    def tie_weights(self) -> None:
        pass

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        return n


class Phi3ForCausalLM(Phi3PreTrainedHead):
    architecture = "Phi3ForCausalLM"

    def __init__(
        self,
        config: Phi3Config,
        attn_implementation: str = DEFAULT_BACKEND,
        device: torch.device | None = None,
        fused_kernels: str | None = None,
    ):
        super().__init__(config, attn_implementation, device, fused_kernels)
        self.lm_head = Linear(
            config.initializer_range, config.hidden_size, config.vocab_size, bias=False, device=device
        )
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
    ) -> ModelOutput:
        """Logits (B, T, V) (or the last ``logits_to_keep`` positions) and, with labels, the mean next-token loss.

        ``return_logits=False`` with labels computes the loss chunk by chunk (fused linear + cross-entropy):
        no (B, T, V) tensor is ever materialised, which is what training uses.
        """
        h = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds)  # (B, T, H)
        if labels is not None and labels.device.type == "cpu":
            check_causal_lm_labels(labels, self.config.vocab_size)  # CUDA labels: checked on the host by the module
        if labels is not None and attention_mask is not None:
            labels = ignore_targets_after_padding(labels, attention_mask)
        if labels is not None and not return_logits:
            x, weight = linear_operands(self.lm_head, h)  # an adapted lm_head: its dropout acts here too
            return ModelOutput(loss=fused_linear_cross_entropy(x, weight, labels), hidden_states=h, cache=cache)
        hk = h[:, -logits_to_keep:] if logits_to_keep else h
        logits = self.lm_head(hk)  # (B, T, V)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, hidden_states=h, cache=cache)

    def row_losses(
        self, hidden_states: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's mean next-token loss (B,) in fp32 (NaN for a row without targets) and its number of targets
        (B,), from the final hidden states (``ModelOutput.hidden_states``) and unshifted ``labels``, with the same
        target rules as :meth:`forward`'s loss. Row by row through the fused loss: no (B, T, vocab) logits.
        The token-weighted mean of the rows is the batch loss."""
        if attention_mask is not None:
            labels = ignore_targets_after_padding(labels, attention_mask)
        weight = self.lm_head.weight
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor outside forward
            weight = weight.full_tensor()
        counts = (shift_labels(labels) != IGNORE_INDEX).sum(-1)  # (B,)
        losses = torch.full((labels.shape[0],), float("nan"), dtype=torch.float32, device=hidden_states.device)
        for i in range(labels.shape[0]):
            if counts[i]:
                losses[i] = fused_linear_cross_entropy(hidden_states[i : i + 1], weight, labels[i : i + 1]).float()
        return losses, counts

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prompt (B, T) (left-padded for batches) -> (B, T + n) tokens; see :func:`generation.generate`."""
        from .generation import generate

        return generate(
            self,
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            generator=generator,
        )


class Phi3ForSequenceClassification(Phi3PreTrainedHead):
    """Pooled classification/regression.

    ``pooling="last"`` (default, as transformers) takes the rightmost token that is not ``pad_token_id``;
    ``pooling="attention"`` learns a query vector and averages the non-pad tokens with softmax weights.
    """

    architecture = "Phi3ForSequenceClassification"

    def __init__(
        self,
        config: Phi3Config,
        attn_implementation: str = DEFAULT_BACKEND,
        device: torch.device | None = None,
        pooling: str = "last",
        fused_kernels: str | None = None,
    ):
        super().__init__(config, attn_implementation, device, fused_kernels)
        if pooling not in ("last", "attention"):
            raise ValueError(f"pooling={pooling!r}; use 'last' (rightmost non-pad token) or 'attention'")
        self.pooling = pooling
        self.num_labels = config.num_labels
        self.score = Linear(config.initializer_range, config.hidden_size, config.num_labels, bias=False, device=device)
        if pooling == "attention":
            self.pool_query = Linear(config.initializer_range, config.hidden_size, 1, bias=False, device=device)

    def pool(
        self, h: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, t, _ = h.shape
        pad = self.config.pad_token_id
        if input_ids is not None and pad is not None:
            non_pad = input_ids != pad
        elif attention_mask is not None:
            non_pad = attention_mask.bool()
        else:
            non_pad = torch.ones(b, t, dtype=torch.bool, device=h.device)
        if self.pooling == "attention":
            w = self.pool_query(h).squeeze(-1).float()  # (B, T)
            w = w.masked_fill(~non_pad, float("-inf")).softmax(-1).nan_to_num(0.0)
            return torch.einsum("bt,bth->bh", w.to(h.dtype), h)
        idx = torch.arange(t, device=h.device, dtype=torch.int32)
        last = (idx * non_pad.to(torch.int32)).argmax(-1)  # rightmost non-pad token, 0 if none
        return h[torch.arange(b, device=h.device), last]

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None
    ) -> ModelOutput:
        h = self.model(input_ids, attention_mask, position_ids, None, inputs_embeds)
        if self.pooling == "last":  # score every position, then pick (transformers' order of operations)
            logits = self.pool(self.score(h), input_ids, attention_mask)  # (B, num_labels)
        else:
            logits = self.score(self.pool(h, input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss, _ = sequence_classification_loss(logits, labels, self.num_labels, self.config.problem_type)
        return ModelOutput(logits=logits, loss=loss, hidden_states=h)


class Phi3ForTokenClassification(Phi3PreTrainedHead):
    """Per-token classes: dropout then ``score`` (with bias), as transformers."""

    architecture = "Phi3ForTokenClassification"

    def __init__(
        self,
        config: Phi3Config,
        attn_implementation: str = DEFAULT_BACKEND,
        device: torch.device | None = None,
        fused_kernels: str | None = None,
    ):
        super().__init__(config, attn_implementation, device, fused_kernels)
        self.num_labels = config.num_labels
        p = config.classifier_dropout if config.classifier_dropout is not None else 0.1
        self.dropout = nn.Dropout(p)
        self.score = Linear(config.initializer_range, config.hidden_size, config.num_labels, bias=True, device=device)

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None
    ) -> ModelOutput:
        h = self.model(input_ids, attention_mask, position_ids, None, inputs_embeds)
        logits = self.score(self.dropout(h))  # (B, T, num_labels)
        loss = token_classification_loss(logits, labels, self.num_labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, hidden_states=h)


HEADS: dict[str, type[Phi3PreTrainedHead]] = {
    "causal_lm": Phi3ForCausalLM,
    "sequence_classification": Phi3ForSequenceClassification,
    "token_classification": Phi3ForTokenClassification,
}
"""The task registry: task name -> head class (whose ``architecture`` is its config.json name). The one list of
tasks: the LightningModules (``modules/tasks.py``), the loaders and the memory planner read it."""
TASKS = tuple(HEADS)
ARCHITECTURE_TASKS = {cls.architecture: task for task, cls in HEADS.items()}
"""config.json ``architectures`` name -> task."""
