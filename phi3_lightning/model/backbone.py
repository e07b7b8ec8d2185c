"""The Phi-3 backbone: token embedding, decoder layers, final norm. Shared by every head."""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Phi3Attention
from .backends import BACKENDS, DEFAULT_BACKEND, check_backend
from .config import Phi3Config
from .fused import check_fused_kernels
from .layer import Phi3DecoderLayer
from .linear import Embedding
from .masking import build_context
from .mlp import Phi3MLP
from .norm import Phi3RMSNorm
from .rope import Phi3RotaryEmbedding
from .selective_checkpoint import selective_context_fn


def device_memory(device: torch.device) -> int | None:
    """Bytes a model can ever occupy on ``device``: physical memory + swap for the CPU, the GPU's total memory;
    None when unknown (then nothing is refused)."""
    try:
        if device.type == "cpu":
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            try:
                with open("/proc/meminfo") as f:
                    swap = next((int(line.split()[1]) * 1024 for line in f if line.startswith("SwapTotal:")), 0)
            except OSError:
                swap = 0
            return total + swap
        if device.type == "cuda" and torch.cuda.is_available():
            return torch.cuda.get_device_properties(device.index or 0).total_memory
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None
    return None


def check_fits_on_device(config: Phi3Config, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before anything is allocated, a config whose weights alone exceed all the memory of ``device`` (a
    crafted or mistyped config.json would otherwise end in an allocator error or the OOM killer). The meta device
    allocates nothing and is never refused (FSDP2 shards such a model before materialising it)."""
    if device.type == "meta":
        return
    available = device_memory(device)
    if available is None:
        return
    h = config.hidden_size
    n = config.num_parameters(include_embeddings=False) + config.vocab_size * h
    need = n * dtype.itemsize
    if need <= available:
        return
    raise ValueError(
        f"this config has {n / 1e9:,.1f}B parameters: {need / 2**30:,.0f} GiB of {str(dtype).replace('torch.', '')} "
        f"weights, more than all {available / 2**30:,.0f} GiB of memory of {device} (hidden_size={h}, "
        f"intermediate_size={config.intermediate_size}, num_hidden_layers={config.num_hidden_layers}, "
        f"vocab_size={config.vocab_size}); check config.json / config_overrides for a wrong size, or build the "
        "model on the meta device and shard it (FSDP2) across devices"
    )


def _selective_layer_call(layer: nn.Module, h, rope, ctx, cache, context_fn) -> torch.Tensor:
    """One decoder layer under selective activation checkpointing (matmul / attention outputs kept)."""
    return checkpoint(layer, h, rope, ctx, cache, use_reentrant=False, context_fn=context_fn)


def _layer_call(layer: nn.Module, h, rope, ctx, cache) -> torch.Tensor:
    return layer(h, rope, ctx, cache)


class Phi3Model(nn.Module):
    """Backbone: ``forward(input_ids, attention_mask, position_ids, cache) -> (B, T, hidden)`` final-normed states."""

    def __init__(
        self,
        config: Phi3Config,
        attn_implementation: str = DEFAULT_BACKEND,
        device: torch.device | None = None,
        fused_kernels: str | None = None,
    ):
        super().__init__()
        # (device None: the default device, which a `with torch.device("meta")` block sets)
        check_fits_on_device(config, torch.empty(0, device=device).device, torch.get_default_dtype())
        self.config = config
        pad = (
            config.pad_token_id if config.pad_token_id is not None and config.pad_token_id < config.vocab_size else None
        )
        self.embed_tokens = Embedding(
            config.initializer_range, config.vocab_size, config.hidden_size, pad, device=device
        )
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, i, device=device) for i in range(config.num_hidden_layers))
        self.norm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps, device=device)
        self.rotary_emb = Phi3RotaryEmbedding(config, device=device)
        self.gradient_checkpointing = False
        self.checkpoint_every = 1  # with gradient_checkpointing: recompute layers 0, n, 2n, ... (1 = every layer)
        # with gradient_checkpointing: keep the matmul / attention outputs of every layer and recompute only the
        # elementwise ops (model/selective_checkpoint.py) instead of recomputing whole layers
        self.checkpoint_selective = False
        # torch_compile "layers" with selective checkpointing (compile_selective_layers): the checkpointed call
        # compiled (dynamo traces checkpoint + the policy, inductor saves what it says), and the plain layer call
        # compiled for forwards without recomputation (evaluation); plain attributes, not submodules
        self._compiled_checkpointed = None
        self._compiled_layer = None
        self._warned_eager_fallback = False
        self._selective_context = selective_context_fn(
            config.intermediate_size, config.hidden_size, config.num_attention_heads * config.head_size
        )
        self.attn_implementation = DEFAULT_BACKEND
        self.set_attn_implementation(attn_implementation)
        self.fused_kernels: str | None = None
        self.set_fused_kernels(fused_kernels)

    def set_attn_implementation(self, name: str) -> None:
        """Switch to backend ``name`` (a key of :data:`~phi3_lightning.model.backends.BACKENDS`); every layer uses
        it from the next forward on."""
        check_backend(name)
        self.attn_implementation = name

    def set_fused_kernels(self, name: str | None) -> None:
        """Use kernel set ``name`` (a key of :data:`~phi3_lightning.model.fused.FUSED_KERNELS`) for RMSNorm, SwiGLU
        and RoPE from the next forward on; None = the eager modules. A plain attribute of each module: parameters,
        state_dict and checkpoints do not change."""
        kernels = check_fused_kernels(name, hidden_act=self.config.hidden_act)
        for m in self.modules():
            if isinstance(m, (Phi3RMSNorm, Phi3MLP, Phi3Attention)):
                if kernels is None:
                    m.__dict__.pop("fused", None)  # back to the class default (None): the eager code
                else:
                    m.fused = kernels
        self.fused_kernels = name

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
            if not torch.compiler.is_compiling() and input_ids.numel():
                lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one host sync
                if lo < 0 or hi >= self.config.vocab_size:
                    raise ValueError(
                        f"input_ids hold token id {hi if hi >= self.config.vocab_size else lo} outside the vocabulary "
                        f"[0, {self.config.vocab_size}); use the checkpoint's tokenizer or raise vocab_size"
                    )
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be (batch, seq_len, hidden_size={self.config.hidden_size}), got "
                f"{tuple(inputs_embeds.shape)}"
            )
        b, t, _ = inputs_embeds.shape
        if b == 0 or t == 0:
            raise ValueError(f"empty batch: input of shape {(b, t)}; pass at least one row of at least one token")
        past = cache.length if cache is not None else 0
        if past + t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past + t} tokens exceeds max_position_embeddings={self.config.max_position_embeddings}; "
                "shorten it (max_length / row length) or use a long-context (128k) checkpoint"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=inputs_embeds.device)[None].expand(b, t)
        elif position_ids.dim() != 2 or position_ids.shape[1] != t or position_ids.shape[0] not in (1, b):
            raise ValueError(
                f"position_ids of shape {tuple(position_ids.shape)} do not fit the input of (batch, seq_len) = "
                f"({b}, {t}); pass position_ids of shape ({b}, {t}) or ({1}, {t}) (one row for the whole batch)"
            )
        else:
            position_ids = position_ids.expand(b, t)  # (1, T) -> (B, T): every backend reads one row per sequence
        ctx = build_context(
            batch_size=b,
            q_len=t,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_len=past,
            sliding_window=self.config.sliding_window,
            derive_documents=cache is None,
            device=inputs_embeds.device,
        )
        backend = BACKENDS[self.attn_implementation]
        backend.prepare(ctx, inputs_embeds.dtype)  # masks / varlen metadata once, shared by every layer
        ctx.attend = backend.attend
        rope = self.rotary_emb(position_ids, inputs_embeds.dtype)  # (B, T, R) each
        h = inputs_embeds
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        # the SDPA by-document path breaks the graph, which dynamo cannot do inside a checkpoint
        eager_only = ctx.by_document and self.attn_implementation == "sdpa"
        if recompute and self.checkpoint_selective and self._compiled_checkpointed is not None and eager_only:
            if not self._warned_eager_fallback:
                self._warned_eager_fallback = True
                warnings.warn(
                    "torch_compile='layers' with selective activation checkpointing: packed or padded rows under "
                    "sdpa run their layers uncompiled (the by-document attention cannot be traced inside a "
                    "checkpoint); use flash_attention_2 or flex for compiled packed rows, or full rows",
                    stacklevel=2,
                )
        for i, layer in enumerate(self.layers):
            if recompute and self.checkpoint_selective:
                if self._compiled_checkpointed is not None and not eager_only:
                    h = self._compiled_checkpointed(layer, h, rope, ctx, cache, self._selective_context)
                else:
                    h = _selective_layer_call(layer, h, rope, ctx, cache, self._selective_context)
            elif self._compiled_layer is not None and not recompute:
                h = self._compiled_layer(layer, h, rope, ctx, cache)
            elif recompute and i % self.checkpoint_every == 0:
                h = checkpoint(layer, h, rope, ctx, cache, use_reentrant=False)
            else:
                h = layer(h, rope, ctx, cache)
        if cache is not None:
            cache.advance()
        return self.norm(h)

    def compile_selective_layers(self, mode: str | None = None) -> None:
        """``torch_compile: layers`` under selective checkpointing: compile the checkpointed layer call (one graph
        shared by all layers) instead of each layer module. A compiled layer run inside an eager selective checkpoint
        is one opaque region to the policy (its matmuls would be recomputed, or the cache refused); dynamo traced
        through the checkpoint applies the policy to the ops inside. Packed or padded rows under SDPA (the
        by-document path, which runs outside graphs) cannot be traced inside a checkpoint: those batches run the
        eager selective checkpoint (same numbers, uncompiled), with a warning."""
        self._compiled_checkpointed = torch.compile(_selective_layer_call, mode=mode)
        self._compiled_layer = torch.compile(_layer_call, mode=mode)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise every weight (normal(0, initializer_range), pad row 0, norms 1) and rope buffers."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
