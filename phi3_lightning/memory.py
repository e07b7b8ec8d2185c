"""Memory planner: per-GPU bytes of a Phi-3 fine-tuning run, before you launch it.

```
python -m phi3_lightning.memory --preset phi-3-mini-4k --method lora --precision bf16-true --seq-len 4096 --batch-size 1
python -m phi3_lightning.memory --preset tiny --precision 32-true --measure     # estimate vs. measured on this CPU
python -m phi3_lightning.memory --preset phi-3-mini-4k --method full --precision bf16-true --optimizer-in-backward
```

What is counted (bytes per GPU; ``P`` parameters, ``P_t`` trainable ones):

- weights: ``P x w`` (w = 4 for 32-true and the mixed precisions, whose master weights are fp32; 2 for 16/bf16-true);
  LoRA adds its adapters. FSDP2 divides by the world size.
- gradients: ``P_t x w`` (FSDP2: / world size).
- optimizer: ``P_t x states x w`` (AdamW/Adam: 2 states, exp_avg and exp_avg_sq, created like the parameter, so in
  bf16 under bf16-true; SGD with momentum: 1) (FSDP2: / world size).
- activations: the tensors autograd saves for backward, per token of the micro-batch, summed over layers -- the
  formula below, checked exactly against ``saved_tensors_hooks`` on CPU in the tests.
- other: working memory next to the activations in forward/backward -- about one layer's activations plus the
  fused loss's vocabulary-sized buffers (with checkpointing: the recomputed layer and its backward), FSDP2's
  all-gathered layers. DDP's gradient buckets (a persistent second copy of the gradients) are counted apart.
- step temporaries: AdamW's foreach temporaries inside ``optimizer.step()``, about one copy of the trained params.

- with ``--optimizer-in-backward`` (``model.init_args.optimizer_in_backward``: each parameter is updated inside
  backward as soon as its gradient is complete, and that gradient freed): gradients = the largest single trained
  parameter's gradient and step temporaries = that parameter's share of the optimizer's temporaries, both counted
  in the forward/backward phase (they now exist while activations are still alive) and nothing in the step phase.
  An upper bound: one gradient lives at a time (the hook frees it before autograd goes on), the largest is not
  necessarily alive at the activation peak, and lm_head's gradient is already partly counted in the fused loss's
  saved gradient. Single GPU only, no gradient accumulation (as the module refuses). Not yet measured on a GPU.

``total`` is the peak of the two phases: ``weights + optimizer + max(activations + other, gradients + step
temporaries)`` (gradients are set to None between steps, so they build up while the activations are freed; with
gradient accumulation they are added to the first term). The CUDA context (~0.5 GiB) and the caching allocator's
reserve (5-15 % over allocated) come on top.

Checked on an NVIDIA H200 (torch 2.11, random phi-3-mini, two AdamW steps, peak ``max_memory_allocated``),
estimate / measured GiB (the working-memory terms were calibrated on these runs, the rest is derived):

    LoRA r=16 bf16-true, 1 x 4096              26.6 / 26.6     (+ activation checkpointing: 9.4 / 9.4)
    LoRA r=16 bf16-true, 4 x 1024              25.6 / 25.6
    LoRA r=16 bf16-mixed, 1 x 2048             31.3 / 31.5
    full bf16-true, 1 x 2048                   35.6 / 35.6     (+ activation checkpointing: 35.6 / 35.6)
    full bf16-mixed, 1 x 1024                  71.2 / 71.2

and the saved-activation bytes of every run matched the formula below to the byte (``saved_tensors_hooks``).

Activation formula for one of our Phi-3 decoder layers, bytes per token (read off ``layer.py``, ``norm.py``,
``attention.py``, ``mlp.py``; ``h`` hidden, ``I`` intermediate, ``H``/``Hkv`` query/kv heads of width ``d``,
``r`` residual-stream bytes (4 for 32-true and mixed, 2 for 16/bf16-true), ``a`` compute bytes (2 except 32-true),
``Tk`` keys per query):

    each RMSNorm (x2)   4h (x.float())  + 4 (rsqrt)  + r*h (normalised, only if the norm weight trains)
                        + a*h (its output, the next matmul's input)
    attention           what the backend saves (``Backend.activations`` in ``model/backends.py``):
      sdpa, full rows   q H*d + k + v + out H*d  (all x a)  + 4H (logsumexp)
                        MHA: k = Hkv*d, v keeps the fused qkv buffer alive: (H + 2 Hkv)*d
                        GQA: k and v are repeated to H heads: H*d each (the qkv buffer is freed)
                        sliding window < T: + a*Tk (the dense bool mask as a float bias)
      sdpa, padded or   run document by document (``model/varlen.py``), no (T, T) mask: per token of the length
      packed rows       groups q, k, v, out (H heads each) + 4H logsumexp, the gathered outputs and o_proj's input:
      (``masked``)      6*a*H*d + 4H. Counted for B*T tokens whose documents fill their power-of-two length group
                        (padding tokens cost less; documents of unequal length in one group pad to its longest:
                        up to 2x on q, k, v, out). Sliding window < T: + a*T*T per layer (the (L, L) window mask of
                        a document as long as the row, the worst case; documents within the window need none).
                        Once per model: 32 bytes per token of gather/scatter indices (+ 4, the document ids, with
                        activation checkpointing).
      flash / flex      k = Hkv*d, v = the qkv buffer (no repeat), no mask saved
      eager             4*H*d + a*H*Tk probabilities (+ 4*H*Tk fp32 softmax output when a = 2)
    MLP                 a*(2I + I + I): the gate|up buffer, act(gate), up*act(gate)
    mixed precision     + 2 bytes per linear weight of the layer (autocast's bf16 weight copies, saved for backward)
    LoRA                + a*r_lora per adapted projection (x @ A^T); normalised tensors of frozen norms are not saved;
                        layer 0 (frozen embedding, no gradient flows into it) skips norm 1 and the qkv weight copy

Once per model: token ids 8, rope cos+sin 2*rotary_dim*r, the final norm (as above, without the output term),
and the fused linear cross-entropy's saved gradients: a*h per token plus ``vocab x h x w`` for lm_head (computed
even when lm_head is frozen). With activation checkpointing each layer keeps only its input, r*h per token, and
one layer's full activations exist again during its recomputation; the masks the attention context caches stay
referenced until backward (eager: the additive mask, r (+ a under autocast) bytes per (T, T) entry, per row with
padding, documents or a window < T, and then also the (B, T, T) bool mask; sdpa, full rows, window < T: the bool
mask). Selective checkpointing
(``--activation-checkpointing selective``) keeps per layer its input and the outputs of its matmuls and attention
kernel (:func:`selective_layer_bytes`); the recomputation's working memory is counted as for full checkpointing.

Numbers for the GPU side (CUDA flash / efficient SDPA kernels save the same q, k, v, out, logsumexp) are the same
formula; only the CPU-measurable parts are checked exactly in the tests.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .model.backends import BACKENDS, DEFAULT_BACKEND, check_backend
from .model.config import PRESETS, Phi3Config, resolve_model
from .model.heads import TASKS
from .model.lora import DEFAULT_TARGETS, LoRAConfig, lora_num_parameters
from .options import DefaultsHelpFormatter, StrictArgumentParser

GiB = 1024**3
# Share of a GPU's memory an estimate may fill and still "fit": the CUDA context (~0.5 GiB) and the caching
# allocator's reserve (5-15 % over allocated) come on top of what the planner counts.
FIT_SHARE = 0.9
METHODS = ("full", "lora")
STRATEGIES = ("single", "ddp", "fsdp2")
OPTIMIZERS = {"adamw": 2, "adam": 2, "sgd": 1, "sgd-nomomentum": 0}
SELECTIVE = "selective"  # activation_checkpointing: op-level, matmul / attention outputs kept
_RNG_STATE_BYTES = 5056  # torch's CPU generator state, stored by every checkpointed layer (preserve_rng_state)


@dataclass(frozen=True)
class _Precision:
    weight: int  # bytes per parameter, gradient and optimizer state
    compute: int  # bytes of matmul outputs / activations (a)
    residual: int  # bytes of the residual stream and embeddings (r)
    autocast: bool


PRECISIONS = {
    "32-true": _Precision(4, 4, 4, False),
    "bf16-true": _Precision(2, 2, 2, False),
    "16-true": _Precision(2, 2, 2, False),
    "bf16-mixed": _Precision(4, 2, 4, True),
    "16-mixed": _Precision(4, 2, 4, True),
}


@dataclass
class MemoryEstimate:
    """Per-GPU bytes of one training step by category, and the estimated peak ``total``.

    ``other`` is working memory next to the activations during forward/backward; ``step_temporaries`` exist only
    inside ``optimizer.step()``, when the activations are gone. Gradients (set to None by ``zero_grad``) appear in
    backward as activations are freed, so they are counted with the optimizer step, or also through the forward when
    gradients are accumulated over micro-batches:

        total = weights + optimizer + comm_buffers
                + max(activations + other [+ gradients when accumulating], gradients + step_temporaries)
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int
    other: int
    step_temporaries: int
    params: int
    trainable_params: int
    comm_buffers: int = 0
    grads_during_forward: bool = False
    in_backward: bool = False  # optimizer_in_backward: gradients + step temporaries live during backward
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def forward_backward_peak(self) -> int:
        if self.in_backward:
            return self.activations + self.other + self.gradients + self.step_temporaries
        return self.activations + self.other + (self.gradients if self.grads_during_forward else 0)

    @property
    def optimizer_step_peak(self) -> int:
        return 0 if self.in_backward else self.gradients + self.step_temporaries

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.optimizer
            + self.comm_buffers
            + max(self.forward_backward_peak, self.optimizer_step_peak)
        )

    @property
    def peak_phase(self) -> str:
        return "optimizer step" if self.optimizer_step_peak > self.forward_backward_peak else "forward/backward"

    def gib(self, name: str = "total") -> float:
        return getattr(self, name) / GiB

    def summary(self) -> str:
        s = self.settings
        what = "LoRA (r={}) fine-tuning".format(s["lora_rank"]) if s["method"] == "lora" else "full fine-tuning"
        where = "1 GPU" if s["strategy"] == "single" else f"{s['strategy']} x {s['world_size']} GPUs"
        every = s["activation_checkpointing"]
        ckpt = ", activation checkpointing" if every else ""
        if every == SELECTIVE:
            ckpt = ", selective activation checkpointing"
        elif every > 1:
            ckpt += f" of every {ordinal(every)} layer"
        ckpt += ", optimizer step in backward" if s.get("optimizer_in_backward") else ""
        return (
            f"{what} of {s['model']} ({self.params / 1e9:.2f}B params, {self.trainable_params / 1e6:.1f}M trained) "
            f"in {s['precision']} on {where}, batch {s['batch_size']} x {s['seq_len']} tokens{ckpt}"
        )

    def format_table(self) -> str:
        rows = [("weights", self.weights), ("optimizer state", self.optimizer)]
        if self.comm_buffers:
            rows.append(("DDP gradient buckets", self.comm_buffers))
        rows += [
            ("activations", self.activations),
            ("other (fwd/bwd working)", self.other),
            ("gradients", self.gradients),
            ("optimizer-step temporaries", self.step_temporaries),
        ]
        lines = [self.summary(), "", f"{'per GPU':<30}{'GiB':>10}", "-" * 40]
        lines += [f"{name:<30}{b / GiB:>10.2f}" for name, b in rows]
        grads = " + gradients" if self.grads_during_forward else ""
        rule = (
            "(activations + other + one parameter's gradient and step temporaries): the optimizer steps in backward"
            if self.in_backward
            else f"the larger of (activations + other{grads}) and (gradients + step temporaries)"
        )
        lines += [
            "-" * 40,
            f"{'total (peak: ' + self.peak_phase + ')':<30}{self.total / GiB:>10.2f}",
            f"total = weights + optimizer state{' + buckets' if self.comm_buffers else ''} + {rule}",
        ]
        if self.details:
            lines += ["", "breakdown:"]
            lines += [f"  {k:<58}{v / GiB:>9.3f} GiB" for k, v in self.details.items()]
        if self.notes:
            lines += [""] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- parameter counts
def _head_params(c: Phi3Config, head: str) -> int:
    if head == "causal_lm":
        return 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    if head == "sequence_classification":
        return c.hidden_size * c.num_labels
    return c.hidden_size * c.num_labels + c.num_labels  # token classification: bias


def _count_params(c: Phi3Config, head: str) -> int:
    lm = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return c.num_parameters() - lm + _head_params(c, head)


def largest_trained_param(c: Phi3Config, method: str, head: str, lora_rank: int) -> int:
    """Elements of the largest trained parameter (what one in-backward gradient can be at most)."""
    shapes = c.linear_shapes().values()
    if method == "lora":  # A (r x in) and B (out x r) of the adapted projections, and a trained classifier head
        sizes = [lora_rank * max(o, i) for o, i in shapes]
        return max(sizes + ([_head_params(c, head)] if head != "causal_lm" else []))
    sizes = [o * i for o, i in shapes] + [c.vocab_size * c.hidden_size]  # the embedding
    return max(sizes + [_head_params(c, head)])


# ----------------------------------------------------------------------------- activations
def layer_activation_bytes(
    c: Phi3Config,
    precision: str,
    tokens: int,
    kv_len: int,
    *,
    method: str = "full",
    lora_rank: int = 16,
    attn_implementation: str = DEFAULT_BACKEND,
    masked: bool = False,
    first_layer: bool = False,
) -> int:
    """Bytes one decoder layer saves for backward (see the module docstring for the formula). ``masked``: padded or
    packed rows."""
    p = PRECISIONS[precision]
    a, r = p.compute, p.residual
    h, i_sz, d = c.hidden_size, c.intermediate_size, c.head_size
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    lora = method == "lora"
    lora_first = lora and first_layer  # no gradient reaches layer 0's input under LoRA (frozen embedding)

    norm = 4 * h + 4 + (0 if lora else r * h) + a * h
    norms = norm * 2 - (4 * h + 4 if lora_first else 0)

    window = c.sliding_window is not None and kv_len > c.sliding_window
    per_layer = 0  # bytes independent of the token count
    kind = check_backend(attn_implementation, runnable=False).activations
    if kind == "fused":
        kv_bytes = nkv * d + (nh + 2 * nkv) * d
        attn = a * (nh * d + kv_bytes + nh * d) + 4 * nh
    elif kind == "scores":
        attn = a * 4 * nh * d + a * nh * kv_len + (4 * nh * kv_len if a != 4 else 0)
    elif masked:  # repeated_kv (sdpa), padded / packed rows: document by document
        attn = a * 6 * nh * d + 4 * nh
        per_layer = a * kv_len * kv_len if window else 0
    else:  # repeated_kv (sdpa), full rows
        kv_bytes = 2 * nh * d if nh != nkv else nkv * d + (nh + 2 * nkv) * d
        attn = a * (nh * d + kv_bytes + nh * d) + 4 * nh
        if window:
            attn += a * kv_len

    mlp = a * 4 * i_sz
    per_token = norms + attn + mlp
    if c.resid_pdrop > 0:
        per_token += 2 * h  # dropout masks (1 byte)
    if lora:
        per_token += a * lora_rank * len(DEFAULT_TARGETS)
    total = per_token * tokens + per_layer
    if p.autocast:  # bf16 copies of the layer's weights, saved by each matmul for grad_input
        shapes = c.linear_shapes()  # {name: (out, in)}
        copies = sum(o * i for name, (o, i) in shapes.items() if not (lora_first and name == "qkv_proj"))
        if lora:  # A and B copies; layer 0's qkv A needs none (its input has no gradient)
            copies += sum(lora_rank * (o + i) for o, i in shapes.values())
            copies -= lora_rank * shapes["qkv_proj"][1] if lora_first else 0
        total += 2 * copies
    return total


def selective_layer_bytes(
    c: Phi3Config,
    precision: str,
    tokens: int,
    kv_len: int,
    *,
    method: str = "full",
    lora_rank: int = 16,
    attn_implementation: str = DEFAULT_BACKEND,
) -> int:
    """Bytes one decoder layer keeps under selective activation checkpointing besides its input: the outputs of the
    ops the policy saves (``model/selective_checkpoint.py``), per token, all in the compute dtype ``a``:

        matmuls     qkv_proj (H + 2 Hkv) d, o_proj h, gate_up_proj 2I (down_proj's output is not kept: only the
                    residual add reads it, and backward does not; kept only if H d == I, where o_proj and down_proj
                    have the same shapes); LoRA: x @ A^T (r) and (x @ A^T) @ B^T (the projection's output width)
                    per adapted projection
        attention   fused kernels (sdpa's flash / efficient, flash, flex): the output H d + 4H (fp32 logsumexp);
                    on padded / packed rows sdpa's per-document calls cover the same tokens (each length group
                    padded to its longest document, counted as filled); eager: its two bmm outputs, the
                    (H, Tk) scores and H d (+ 8 bytes per layer: the fp64 ``scale`` scalar)
    per layer   LoRA: 8 bytes per adapted projection (the fp64 ``scaling`` scalar the recompute multiplies by)

    Everything else (norms and their fp32 copies, RoPE, SiLU * up, casts, masks, gathers) is recomputed."""
    p = PRECISIONS[precision]
    a = p.compute
    h, i_sz, d = c.hidden_size, c.intermediate_size, c.head_size
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    # down_proj's output is left out when it cannot be taken for o_proj's (same shapes): nothing reads it backward
    down = h if nh * d == i_sz else 0
    per_token = a * ((nh + 2 * nkv) * d + h + 2 * i_sz + down)
    per_layer = 0
    if check_backend(attn_implementation, runnable=False).activations == "scores":
        per_token += a * (nh * kv_len + nh * d)
        per_layer += 8  # the fp64 scalar of ``scores * scale``, kept by the checkpoint
    else:
        per_token += a * nh * d + 4 * nh
    if method == "lora":
        shapes = c.linear_shapes()  # {name: (out, in)}
        per_token += a * sum(lora_rank + shapes[name][0] for name in DEFAULT_TARGETS)
        per_layer += 8 * len(DEFAULT_TARGETS)  # the fp64 scalar of ``delta * scaling`` per adapted projection
    return per_token * tokens + per_layer


def checkpointed_layers(num_layers: int, every: int) -> int:
    """How many of ``num_layers`` decoder layers activation checkpointing recomputes when it takes every
    ``every``-th one (layers 0, every, 2*every, ...; 0 = none)."""
    return 0 if not every else -(-num_layers // every)


def ordinal(n: int) -> str:
    """2 -> '2nd', 3 -> '3rd', 11 -> '11th'."""
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def as_checkpoint_every(value: bool | int | str) -> int | str:
    """``activation_checkpointing`` as a number: False/0 -> 0 (off), True/1 -> 1 (every layer), n -> every n-th;
    ``"selective"`` stays ``"selective"`` (every layer keeps its matmul / attention outputs)."""
    if value == SELECTIVE:
        return SELECTIVE
    if value is True or value is False:
        return int(value)
    if not isinstance(value, int) or value < 0:
        raise ValueError(
            f"activation_checkpointing={value!r}: give true (recompute every decoder layer), false, a whole number "
            "n >= 1 (recompute every n-th layer: 2 = half of them, for about half the saving and half the extra "
            "compute) or 'selective' (keep the matmul and attention outputs, recompute only the elementwise ops)"
        )
    return value


def _activation_parts(
    c: Phi3Config,
    precision: str,
    method: str,
    head: str,
    batch_size: int,
    seq_len: int,
    checkpointing: int | str,
    lora_rank: int,
    attn_implementation: str,
    masked: bool,
) -> dict[str, int]:
    p = PRECISIONS[precision]
    a, r = p.compute, p.residual
    h, L = c.hidden_size, c.num_hidden_layers
    tokens = batch_size * seq_len
    lora = method == "lora"
    window_mask = c.sliding_window is not None and seq_len > c.sliding_window
    kind = BACKENDS[attn_implementation].activations
    kw = dict(method=method, lora_rank=lora_rank, attn_implementation=attn_implementation, masked=masked)
    layer = layer_activation_bytes(c, precision, tokens, seq_len, **kw)
    first = layer_activation_bytes(c, precision, tokens, seq_len, first_layer=True, **kw)
    parts: dict[str, int] = {}
    if checkpointing:  # the layer being recomputed in backward is counted under "other"
        # layers 0, n, 2n, ... are recomputed (n = 1: all); the others keep their activations as without checkpointing
        kept = L if checkpointing == SELECTIVE else checkpointed_layers(L, checkpointing)
        parts["checkpointed layer inputs"] = kept * r * h * tokens
        parts["checkpoint RNG states"] = kept * _RNG_STATE_BYTES
        if checkpointing == SELECTIVE:
            kw_sel = dict(method=method, lora_rank=lora_rank, attn_implementation=attn_implementation)
            parts["matmul + attention outputs kept (selective)"] = L * selective_layer_bytes(
                c, precision, tokens, seq_len, **kw_sel
            )
        elif kept < L:
            parts["decoder layers not checkpointed"] = (L - kept) * layer
        # the checkpoint keeps the attention context, and with it the masks it caches, referenced until backward
        if kind == "scores":
            # eager: the additive mask, built in the residual dtype before the layers (+ under autocast its copy in
            # the compute dtype): (1, 1, T, T) on plain causal rows; (B, 1, T, T) when padding, documents or a
            # window < T make it per row, next to the (B, 1, T, T) bool mask it is made from (+ on packed rows the
            # (B, T) int32 document ids)
            per_row = masked or window_mask
            parts["attention mask (additive, shared)"] = (
                (r + (a if a != r else 0)) * (batch_size if per_row else 1) * seq_len * seq_len
            )
            if per_row:
                parts["attention mask (bool, shared)"] = batch_size * seq_len * seq_len
            if masked:
                parts["document ids"] = 4 * tokens
        elif kind == "repeated_kv" and window_mask and not masked:  # sdpa, full rows: the shared bool mask
            parts["attention mask (bool, shared)"] = batch_size * seq_len * seq_len
    else:
        parts["decoder layers"] = first + (L - 1) * layer
    if masked and kind == "repeated_kv":  # document by document: gather/scatter indices, shared by the layers
        # (+ with checkpointing the int32 document ids the layers' inputs reference; cu_seqlens, 4 bytes per
        # document, is left out)
        parts["document indices"] = (32 + (4 if checkpointing else 0)) * tokens
    parts["ids + rope cos/sin"] = (0 if lora else 8 * tokens) + 2 * c.rotary_dim * r * tokens
    parts["final norm"] = (4 * h + 4 + (0 if lora else r * h)) * tokens
    if head == "causal_lm":
        kept = batch_size * (seq_len - 1)  # positions with a next-token target
        # grad wrt hidden (a*h per kept token, + its int64 index) and, when lm_head trains (not under LoRA, which
        # freezes it), grad wrt lm_head.weight in the compute dtype
        parts["fused loss: saved grads"] = (8 + a * h) * kept + (0 if lora else c.vocab_size * h * a)
    else:
        parts["classification head"] = a * h * tokens
    return parts


# ----------------------------------------------------------------------------- the estimator
def _resolve_config(config_or_preset: Phi3Config | str) -> tuple[Phi3Config, str]:
    """(config, name shown in the table)."""
    name = "custom config" if isinstance(config_or_preset, Phi3Config) else str(config_or_preset)
    return resolve_model(config_or_preset)[0], name


def estimate_memory(
    config_or_preset: Phi3Config | str,
    method: str = "full",
    precision: str = "bf16-mixed",
    strategy: str = "single",
    world_size: int = 1,
    seq_len: int = 4096,
    batch_size: int = 1,
    activation_checkpointing: bool | int | str = False,
    lora_rank: int = 16,
    optimizer: str = "adamw",
    head: str = "causal_lm",
    attn_implementation: str = DEFAULT_BACKEND,
    masked: bool = False,
    accumulate_grad_batches: int = 1,
    optimizer_in_backward: bool = False,
) -> MemoryEstimate:
    """Per-GPU memory of one training step (micro-batch ``batch_size`` x ``seq_len`` on each GPU).

    ``config_or_preset``: a :class:`Phi3Config`, a preset name or a checkpoint directory. ``masked``: batches carry
    padding or packed documents (SDPA then runs document by document: no dense mask; on full rows the sliding
    window of the 4k checkpoints adds a dense one above 2047 tokens). ``accumulate_grad_batches > 1`` keeps gradients alive through the forward.
    ``optimizer_in_backward``: each parameter is stepped in backward (one gradient alive at a time; see the module
    docstring); single GPU, no accumulation. ``activation_checkpointing``: True (every decoder layer) or n (layers
    0, n, 2n, ... are recomputed; the others keep their activations) or ``"selective"`` (every layer keeps its
    matmul and attention outputs: :func:`selective_layer_bytes`).
    """
    c, name = _resolve_config(config_or_preset)
    activation_checkpointing = as_checkpoint_every(activation_checkpointing)
    checks = [
        (method, METHODS, "method"),
        (precision, PRECISIONS, "precision"),
        (strategy, STRATEGIES, "strategy"),
        (optimizer, OPTIMIZERS, "optimizer"),
        (head, TASKS, "head"),
    ]
    check_backend(attn_implementation, runnable=False)  # planned for a GPU: it need not run on this machine
    for value, allowed, what in checks:
        if value not in allowed:
            raise ValueError(f"{what}={value!r}; choose one of {', '.join(allowed)}")
    for value, what in (
        (world_size, "world_size"),
        (seq_len, "seq_len"),
        (batch_size, "batch_size"),
        (lora_rank, "lora_rank"),
        (accumulate_grad_batches, "accumulate_grad_batches"),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{what}={value!r} must be a positive integer")
    if strategy == "single" and world_size != 1:
        raise ValueError(f"strategy='single' runs on one GPU but world_size={world_size}; use ddp or fsdp2")
    if optimizer_in_backward and strategy != "single":
        raise ValueError(
            f"optimizer_in_backward runs on one GPU only, not with strategy={strategy!r} (DDP reduces and FSDP2 "
            "shards the gradients after the per-parameter hooks would fire); use strategy single or drop it"
        )
    if optimizer_in_backward and accumulate_grad_batches > 1:
        raise ValueError(
            f"optimizer_in_backward cannot be combined with accumulate_grad_batches={accumulate_grad_batches}: "
            "the micro-batches' gradients would have to stay alive; use a larger micro-batch or drop it"
        )
    if seq_len > c.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds max_position_embeddings={c.max_position_embeddings} of {name}")

    p = PRECISIONS[precision]
    w = p.weight
    n = _count_params(c, head)
    lora = method == "lora"
    n_lora = lora_num_parameters(c, LoRAConfig(r=lora_rank)) if lora else 0
    head_trained = _head_params(c, head) if head != "causal_lm" else 0
    trainable = n_lora + head_trained if lora else n
    total_params = n + n_lora
    shard = world_size if strategy == "fsdp2" else 1

    weights = math.ceil(total_params * w / shard)
    gradients = math.ceil(trainable * w / shard)
    largest = largest_trained_param(c, method, head, lora_rank)
    if optimizer_in_backward:
        gradients = largest * w
    optim = math.ceil(trainable * OPTIMIZERS[optimizer] * w / shard)

    parts = _activation_parts(
        c,
        precision,
        method,
        head,
        batch_size,
        seq_len,
        activation_checkpointing,
        lora_rank,
        attn_implementation,
        masked,
    )
    activations = sum(parts.values())

    # Working memory next to the activations (calibrated on an H200 with phi-3-mini, see the module docstring):
    # without checkpointing the peak sits at the start of backward, about one layer's activations of gradient
    # buffers plus the loss's vocabulary-sized buffers; with checkpointing it is the recomputed layer plus its
    # backward (~2 layers), or the loss buffers at the end of the forward, whichever is larger.
    tokens = batch_size * seq_len
    layer = layer_activation_bytes(
        c,
        precision,
        tokens,
        seq_len,
        method=method,
        lora_rank=lora_rank,
        attn_implementation=attn_implementation,
        masked=masked,
    )
    loss_buffers = 0
    if head == "causal_lm":
        chunk = min(1024, batch_size * (seq_len - 1))
        # fp32 workspace (chunk x vocab) + in low precision the chunk's logits / gradient in the compute dtype and
        # the fp32 lm_head gradient accumulator; in fp32 the logits are written straight into the workspace
        loss_buffers = chunk * c.vocab_size * (4 + (p.compute if p.compute != 4 else 0)) + (
            c.vocab_size * c.hidden_size * 4 if p.compute != 4 else 0
        )
    other: dict[str, int] = {}
    if activation_checkpointing:
        if 2 * layer >= loss_buffers:
            other["recomputed layer + its backward (~2 layers)"] = 2 * layer
        else:
            other["fused loss chunk + fp32 grad accumulator"] = loss_buffers
    else:
        other["backward working memory (~1 layer)"] = layer
        if loss_buffers:
            other["fused loss chunk + fp32 grad accumulator"] = loss_buffers
    if strategy == "fsdp2" and world_size > 1:
        per_layer = sum(o * i for o, i in c.linear_shapes().values()) + 2 * c.hidden_size
        root = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        # two layers in flight (prefetch) + the root unit (embedding / lm_head), gathered in the compute dtype
        other["fsdp2 all-gathered params"] = (2 * per_layer + root) * p.compute
        if not lora:
            other["fsdp2 unsharded grads before reduce-scatter"] = 2 * per_layer * w
    comm = gradients if strategy == "ddp" else 0  # DDP's buckets: a second, persistent copy of the gradients

    notes = []
    if lora and p.autocast:
        notes.append(f"{precision} keeps the frozen base weights in fp32; bf16-true halves them for LoRA")
    if (
        c.sliding_window is not None
        and seq_len > c.sliding_window
        and BACKENDS[attn_implementation].activations == "repeated_kv"
    ):
        notes.append(
            f"seq_len {seq_len} > sliding_window {c.sliding_window}: SDPA gets an explicit mask "
            + (
                "per layer for documents longer than the window (counted as one document per row)"
                if masked
                else "(a float bias per layer)"
            )
            + "; flash_attention_2 avoids it"
        )
    settings = dict(
        model=name,
        method=method,
        precision=precision,
        strategy=strategy,
        world_size=world_size,
        seq_len=seq_len,
        batch_size=batch_size,
        activation_checkpointing=activation_checkpointing,
        lora_rank=lora_rank,
        optimizer=optimizer,
        head=head,
        attn_implementation=attn_implementation,
        masked=masked,
        accumulate_grad_batches=accumulate_grad_batches,
        optimizer_in_backward=optimizer_in_backward,
    )
    # AdamW (foreach) builds parameter-sized temporaries: one extra copy at its peak (measured on the H200); stepped
    # in backward, one parameter at a time: the largest parameter's copy.
    step = math.ceil((largest if optimizer_in_backward else trainable) * w / shard) if OPTIMIZERS[optimizer] else 0
    details = {f"activations: {k}": v for k, v in parts.items()}
    details.update({f"other: {k}": v for k, v in other.items()})
    if comm:
        details["ddp gradient buckets (persistent)"] = comm
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer=optim,
        activations=activations,
        other=sum(other.values()),
        step_temporaries=step,
        comm_buffers=comm,
        grads_during_forward=accumulate_grad_batches > 1,
        in_backward=optimizer_in_backward,
        params=total_params,
        trainable_params=trainable,
        settings=settings,
        details=details,
        notes=notes,
    )


# ----------------------------------------------------------------------------- OOM advice
def explain_oom(config_or_preset: Phi3Config | str, device_bytes: int | None = None, **kwargs: Any) -> str:
    """A message for a rank that ran out of memory: the estimate, and which changes would make it fit.

    ``kwargs`` are :func:`estimate_memory`'s (the run's settings). ``device_bytes``: the GPU's memory (e.g.
    ``torch.cuda.get_device_properties(0).total_memory``); with it only changes that fit (with 10 % headroom)
    are suggested, smallest change first; without it every alternative is listed with its size.
    """
    est = estimate_memory(config_or_preset, **kwargs)
    s = est.settings
    msg = (
        f"estimated {est.gib():.1f} GiB per GPU for {est.summary()} (weights {est.gib('weights'):.1f}, "
        f"gradients {est.gib('gradients'):.1f}, optimizer {est.gib('optimizer'):.1f}, "
        f"activations {est.gib('activations'):.1f}, other {est.gib('other'):.1f} GiB)"
    )
    if device_bytes:
        msg += f" but the GPU has {device_bytes / GiB:.1f} GiB"
    budget = FIT_SHARE * device_bytes if device_bytes else None
    base = {k: v for k, v in s.items() if k != "model"}
    ckpt = s["activation_checkpointing"] != 1  # not every layer recomputed yet
    candidates: list[tuple[str, dict]] = []
    if not s["activation_checkpointing"]:  # half the recompute cost first
        candidates.append(("activation checkpointing of every 2nd layer", dict(activation_checkpointing=2)))
        candidates.append(("selective activation checkpointing", dict(activation_checkpointing=SELECTIVE)))
    if ckpt:
        candidates.append(("activation checkpointing", dict(activation_checkpointing=True)))
    if s["batch_size"] > 1:
        candidates.append(("batch_size 1 with gradient accumulation", dict(batch_size=1)))
    if s["precision"] in ("bf16-mixed", "16-mixed", "32-true"):
        candidates.append(("precision bf16-true", dict(precision="bf16-true")))
    if s["method"] == "full" and s["strategy"] == "single" and not s.get("optimizer_in_backward"):
        if s.get("accumulate_grad_batches", 1) == 1:
            candidates.append(("optimizer step in backward", dict(optimizer_in_backward=True)))
    if s["method"] == "full":
        candidates.append((f"LoRA (r={s['lora_rank']})", dict(method="lora")))
        if ckpt:
            candidates.append(
                (
                    f"LoRA (r={s['lora_rank']}) + activation checkpointing",
                    dict(method="lora", activation_checkpointing=True),
                )
            )
    for extra_label, extra in (("", {}), (" + activation checkpointing", dict(activation_checkpointing=True))):
        if extra and not ckpt:
            continue
        for world in (2, 4, 8, 16, 32, 64, 128, 256):
            if s["strategy"] == "fsdp2" and world <= s["world_size"]:
                continue
            fsdp = {**extra, "strategy": "fsdp2", "world_size": world, "optimizer_in_backward": False}
            alt = estimate_memory(config_or_preset, **{**base, **fsdp})
            if budget is None or alt.total <= budget:
                candidates.append((f"fsdp2 with {world} GPUs{extra_label}", fsdp))
                break
    tips = []
    for label, change in candidates:
        alt = estimate_memory(config_or_preset, **{**base, **change})
        if budget is None or alt.total <= budget:
            tips.append(f"{label} ({alt.gib():.1f} GiB)")
    if not tips:
        return msg + (
            "; no single change here fits: combine them (LoRA, activation checkpointing, bf16-true, "
            "a shorter seq_len, fsdp2 over more GPUs) or use a GPU with more memory"
        )
    return msg + "; try " + " / ".join(tips)


# ----------------------------------------------------------------------------- measurement (CPU)
def measure(
    config: Phi3Config | str,
    method: str = "full",
    precision: str = "32-true",
    seq_len: int = 128,
    batch_size: int = 2,
    lora_rank: int = 16,
    attn_implementation: str = DEFAULT_BACKEND,
    activation_checkpointing: bool | int | str = False,
    masked: bool = False,
    optimizer_in_backward: bool = False,
    optimizer: str = "adamw",
) -> dict[str, int]:
    """Run one training step of ``optimizer`` (as in :data:`OPTIMIZERS`) on CPU and measure what :func:`estimate_memory` predicts.

    weights / gradients / optimizer: exact tensor sizes. activations: bytes of the distinct storages autograd
    saves during the forward (``saved_tensors_hooks``, parameters excluded) -- the quantity the formula models.
    ``peak_rss_delta``: growth of the process's peak RSS over the step (allocator-dependent, indicative only).
    With ``optimizer_in_backward`` the step runs through :class:`~phi3_lightning.modules.in_backward.InBackwardOptimizer`
    and ``gradients`` is the most gradient bytes alive at once during backward (counted by a hook on every parameter
    that runs before the optimizer's), the quantity the estimate bounds by the largest parameter.
    ``masked``: packed rows of two documents of ``seq_len / 2`` tokens each (position_ids restarting), the layout
    the formula counts exactly for a backend that runs document by document.
    """
    import gc
    import resource
    import warnings

    import torch

    from .model.heads import Phi3ForCausalLM
    from .model.lora import apply_lora

    c, _ = _resolve_config(config)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")

    def make_optimizer(ps):
        if optimizer in ("adamw", "adam"):
            return (torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam)(ps, lr=1e-4)
        return torch.optim.SGD(ps, lr=1e-4, momentum=0.9 if optimizer == "sgd" else 0.0)

    p = PRECISIONS[precision]
    dtype = torch.float32 if p.weight == 4 else (torch.bfloat16 if precision.startswith("bf16") else torch.float16)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(c, attn_implementation=attn_implementation).to(dtype).train()
    if method == "lora":
        apply_lora(model, LoRAConfig(r=lora_rank))
    activation_checkpointing = as_checkpoint_every(activation_checkpointing)
    if activation_checkpointing == SELECTIVE:
        model.gradient_checkpointing_enable(selective=True)
    elif activation_checkpointing:
        model.gradient_checkpointing_enable(activation_checkpointing)
    params = {p_.untyped_storage().data_ptr() for p_ in model.parameters()}
    ids = torch.randint(0, c.vocab_size, (batch_size, seq_len))
    position_ids = None
    if masked:
        half = seq_len - seq_len // 2
        position_ids = torch.cat([torch.arange(half), torch.arange(seq_len - half)])[None].expand(batch_size, -1)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved.setdefault(st.data_ptr(), st.nbytes())
        return t

    def live_tensors() -> list[torch.Tensor]:
        found = []
        with warnings.catch_warnings():  # isinstance() on some deprecated torch module attributes warns
            warnings.simplefilter("ignore")
            for o in gc.get_objects():
                try:
                    if isinstance(o, torch.Tensor) and not o.is_meta:
                        o.untyped_storage().data_ptr()  # fake/functional tensors (left by torch.compile) raise
                        found.append(o)
                except (ReferenceError, RuntimeError):  # a dead weakref.proxy, a tensor without storage
                    pass
        return found

    opt = make_optimizer([q for q in model.parameters() if q.requires_grad])
    before = {t.untyped_storage().data_ptr() for t in live_tensors()} if activation_checkpointing else set()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.autocast(
        "cpu", dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16, enabled=p.autocast
    ):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids, position_ids=position_ids, labels=ids, return_logits=False)
    if activation_checkpointing:
        # Checkpointing keeps non-differentiable layer inputs (rope cos/sin, the mask) as plain references, which
        # the hooks do not see: add every tensor that appeared during the forward and is not a parameter or output
        # (selective checkpointing's cached matmul / attention outputs included: they are held by the checkpoint's
        # cache, not by saved_tensors_hooks).
        skip = params | before | {t.untyped_storage().data_ptr() for t in (out.loss, out.hidden_states)}
        # the fused loss's cached CPU workspace (created by the first call in a process) is working memory ("other")
        from .model.loss import _cpu_workspace

        workspace = getattr(_cpu_workspace, "buf", None)
        if workspace is not None:
            skip.add(workspace.untyped_storage().data_ptr())
        for t in live_tensors():
            if t.untyped_storage().data_ptr() not in skip:
                pack(t)
    # the fused loss keeps its two gradients on its autograd node (handed to autograd in backward), not through
    # save_for_backward, so the hooks do not see them
    for t in getattr(out.loss.grad_fn, "grads", None) or ():
        if t is not None:
            pack(t)
    loss = out.loss
    del out
    activations = sum(saved.values())
    live_peak = 0
    if optimizer_in_backward:
        from .modules.in_backward import InBackwardOptimizer

        trained = [q for q in model.parameters() if q.requires_grad]

        def probe(_p: torch.Tensor) -> None:  # registered first: sees the fresh gradient before the update frees it
            nonlocal live_peak
            live_peak = max(live_peak, sum(q.grad.nbytes for q in trained if q.grad is not None))

        for q in trained:
            q.register_post_accumulate_grad_hook(probe)
        opt = InBackwardOptimizer(make_optimizer, trained)
        opt.step(loss.backward)
    else:
        loss.backward()
        opt.step()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    uniq = {id(q): q for q in model.parameters()}.values()
    return {
        "weights": nbytes(uniq),
        "gradients": live_peak if optimizer_in_backward else nbytes(q.grad for q in uniq if q.grad is not None),
        "optimizer": nbytes(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0),
        "activations": activations,
        "peak_rss_delta": rss1 - rss0,
    }


def compare_table(est: MemoryEstimate, measured: dict[str, int]) -> str:
    lines = [f"{'':<14}{'estimate MiB':>14}{'measured MiB':>14}{'ratio':>8}"]
    for k in ("weights", "gradients", "optimizer", "activations"):
        e, m = getattr(est, k), measured[k]
        lines.append(f"{k:<14}{e / 2**20:>14.3f}{m / 2**20:>14.3f}{(e / m if m else float('nan')):>8.3f}")
    lines.append(
        f"peak RSS growth over the first step (weights were already resident; CPU allocator, indicative): "
        f"{measured['peak_rss_delta'] / 2**20:.1f} MiB vs estimated total - weights "
        f"{(est.total - est.weights) / 2**20:.1f} MiB"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def _checkpointing_arg(text: str) -> int | str:
    """``--activation-checkpointing`` value: a whole number N or ``selective``."""
    if text.strip().lower() == SELECTIVE:
        return SELECTIVE
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a whole number N (recompute every N-th layer) nor 'selective'"
        ) from None


def build_parser() -> StrictArgumentParser:
    """The planner's command line (``python -m phi3_lightning memory --help``)."""
    ap = StrictArgumentParser(
        prog="python -m phi3_lightning memory",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default="phi-3-mini-4k", help=f"named model shape: one of {', '.join(PRESETS)}")
    src.add_argument("--config", help="a checkpoint directory or config.json instead of a preset")
    ap.add_argument(
        "--method",
        default="full",
        choices=METHODS,
        help="full fine-tuning (every weight trained) or LoRA adapters (base weights frozen)",
    )
    ap.add_argument(
        "--precision",
        default="bf16-mixed",
        choices=list(PRECISIONS),
        help="Lightning precision: *-true keeps weights in that dtype, *-mixed keeps fp32 master weights",
    )
    ap.add_argument(
        "--strategy",
        default="single",
        choices=STRATEGIES,
        help="one GPU, DDP (a full replica per GPU) or FSDP2 (weights, gradients, optimizer sharded)",
    )
    ap.add_argument(
        "--world-size",
        "--devices",
        type=int,
        default=None,
        dest="world_size",
        help="GPUs (default 1 for single, 8 for ddp/fsdp2)",
    )
    ap.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per row (default: 4096, or the model's max_position_embeddings if smaller)",
    )
    ap.add_argument("--batch-size", type=int, default=1, help="micro-batch per GPU")
    ap.add_argument(
        "--activation-checkpointing",
        nargs="?",
        type=_checkpointing_arg,
        const=1,
        default=0,
        metavar="N|selective",
        help="recompute decoder layers in backward, keeping only their inputs: every layer, or with N every N-th "
        "one (2 = half of them: about half the saving for half the extra compute); 'selective': every layer keeps "
        "its matmul and attention outputs and recomputes only the elementwise ops (no matmul runs twice) (default: off; "
        "the flag alone: every layer)",
    )
    ap.add_argument(
        "--optimizer-in-backward",
        action="store_true",
        help="update each parameter inside backward and free its gradient (model.init_args.optimizer_in_backward): "
        "one gradient alive at a time, no optimizer-step phase; one GPU, no gradient accumulation",
    )
    ap.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="adapter rank r with --method lora (default 16); with --method full only together with --gpu-memory, "
        "where it sizes the LoRA alternatives the advice suggests",
    )
    ap.add_argument(
        "--optimizer",
        default="adamw",
        choices=list(OPTIMIZERS),
        help="optimizer, for its state per trained parameter (AdamW: two fp32 moments)",
    )
    ap.add_argument("--head", default="causal_lm", choices=TASKS, help="which head is trained")
    ap.add_argument("--attn-implementation", default=DEFAULT_BACKEND, choices=list(BACKENDS), help="attention backend")
    ap.add_argument(
        "--masked",
        action="store_true",
        help="padded or packed batches (SDPA then runs document by document, without a dense mask)",
    )
    ap.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU: say whether it fits, and what would")
    ap.add_argument(
        "--measure",
        action="store_true",
        help="also run one step on this CPU and print estimate vs measured (small presets only)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.config is not None:
        try:
            resolve_model(args.config)
        except FileNotFoundError as e:  # named as the option the user typed, not as resolve_model's model=...
            message = str(e).replace(f"model={str(args.config)!r}", f"--config {args.config!r}", 1)
            raise FileNotFoundError(f"{message} (or plan a named shape with --preset NAME)") from None
    if args.seq_len is None:
        try:
            limit = _resolve_config(args.config or args.preset)[0].max_position_embeddings
        except (ValueError, FileNotFoundError, KeyError):
            limit = 4096  # the estimate below reports the bad preset / config
        args.seq_len = min(4096, limit)
    world = args.world_size if args.world_size is not None else (1 if args.strategy == "single" else 8)
    if args.gpu_memory is not None and not (0 < args.gpu_memory < math.inf):
        ap.error(f"--gpu-memory {args.gpu_memory:g}: give the GPU's memory in GiB, a positive number (e.g. 24, 80)")
    cfg = args.config or args.preset
    if args.measure and args.head != "causal_lm":
        ap.error(
            f"--measure builds a causal LM, not the {args.head} head the estimate is for; drop --measure or "
            "--head (the heads differ only in their last layer)"
        )
    if args.measure and args.strategy != "single":
        ap.error(
            f"--measure runs one process on this CPU, not {args.strategy} over {world} GPUs (whose per-GPU shares "
            "it would be compared with); use --strategy single with --measure"
        )
    if args.lora_rank is not None and args.method == "full" and args.gpu_memory is None:
        ap.error(
            f"--lora-rank {args.lora_rank} is unused with --method full (every weight is trained, there are no "
            "adapters): add --method lora to plan a LoRA run of that rank, or drop --lora-rank"
        )
    if args.lora_rank is None:
        args.lora_rank = 16
    if args.config is None and args.preset not in PRESETS:
        ap.error(f"unknown preset {args.preset!r}; choose one of: {', '.join(PRESETS)}")
    kwargs = dict(
        method=args.method,
        precision=args.precision,
        strategy=args.strategy,
        world_size=world,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        activation_checkpointing=args.activation_checkpointing,
        lora_rank=args.lora_rank,
        optimizer=args.optimizer,
        head=args.head,
        attn_implementation=args.attn_implementation,
        masked=args.masked,
        optimizer_in_backward=args.optimizer_in_backward,
    )
    try:
        est = estimate_memory(cfg, **kwargs)
    except ValueError as e:
        ap.error(str(e))
    print(est.format_table())
    if args.gpu_memory is not None:
        gpu = args.gpu_memory * GiB
        print()
        if est.total <= FIT_SHARE * gpu:
            print(
                f"fits in {args.gpu_memory:g} GiB (estimated {est.gib():.1f} GiB, within {FIT_SHARE:.0%}: room for the "
                "CUDA context and the allocator's reserve)"
            )
        else:
            if est.total <= gpu:
                print(
                    f"tight: estimated {est.gib():.1f} GiB is above {FIT_SHARE:.0%} of {args.gpu_memory:g} GiB; the "
                    "CUDA context (~0.5 GiB) and the allocator's reserve (5-15 %) come on top, so it may not fit"
                )
            print(explain_oom(cfg, int(gpu), **kwargs))
    if args.measure:
        if est.params > 2e8:
            ap.error("--measure builds the model on this CPU; use a small preset (tiny, small-bench)")
        m = measure(
            cfg,
            method=args.method,
            precision=args.precision,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            lora_rank=args.lora_rank,
            attn_implementation=args.attn_implementation,
            activation_checkpointing=args.activation_checkpointing,
            masked=args.masked,
            optimizer_in_backward=args.optimizer_in_backward,
            optimizer=args.optimizer,
        )
        print()
        print(compare_table(est, m))
    return 0


if __name__ == "__main__":  # through the package's entry point: bad input is a one-line error, not a traceback
    from phi3_lightning.cli import main as _cli_main

    sys.exit(_cli_main(["memory", *sys.argv[1:]]))
