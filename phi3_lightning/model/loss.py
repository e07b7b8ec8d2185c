"""Losses of the three heads, and a fused linear + cross-entropy that never materialises all logits.

Causal LM: labels are *not* shifted by the caller. ``labels[t]`` is the token at t; the loss predicts it from
position t - 1, so the target of position t is ``labels[t + 1]`` (the last position has none). -100 is ignored;
the mean runs over counted tokens.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..conventions import IGNORE_INDEX

# CPU only: the fused loss's (chunk, vocab) fp32 workspace is kept between calls, one per thread. A fresh buffer of
# that size (131 MB for 1024 x 32064) is page-faulted in again on every step, because glibc hands such blocks back
# to the kernel on free: ~0.7 ms per MB on the 2-core benchmark machine. CUDA's caching allocator already reuses it.
_cpu_workspace = threading.local()


def _workspace(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty((rows, cols), dtype=torch.float32, device=device)
    buf = getattr(_cpu_workspace, "buf", None)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
        buf = _cpu_workspace.buf = None  # drop the old one before allocating its replacement
        # a normal tensor even under inference_mode (Trainer.validate), so a later training step may write into it
        with torch.inference_mode(False):
            buf = _cpu_workspace.buf = torch.empty((rows, cols), dtype=torch.float32)
    return buf[:rows]


def release_workspace() -> None:
    """Free this thread's cached CPU workspace of :func:`fused_linear_cross_entropy` (chunk x vocab fp32)."""
    _cpu_workspace.buf = None


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets: targets[:, t] = labels[:, t + 1], -100 at the end."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over positions whose target is not -100."""
    targets = shift_labels(labels)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = mean_i CE(h_i @ W^T, y_i), computed chunk by chunk; gradients are computed in the forward.

    Memory: one (chunk, vocab) fp32 workspace (kept between calls on CPU), reused by every chunk and updated in
    place (logits -> exp -> softmax / n -> (softmax - onehot) / n), instead of (N, vocab) logits plus their
    gradient; no recompute.
    Every target is assumed valid (the caller drops ignored positions first).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        n = hidden.shape[0]
        needs_grad = hidden.requires_grad or weight.requires_grad
        need_w = weight.requires_grad  # a frozen lm_head (LoRA) needs no (V, H) gradient buffer
        fp32 = hidden.dtype == torch.float32 and weight.dtype == torch.float32
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if needs_grad else None
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        buf = _workspace(min(chunk, n), weight.shape[0], hidden.device)
        inv_n = 1.0 / n
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk]  # (C, H)
            c = h.shape[0]
            y = targets[s : s + chunk, None]  # (C, 1)
            b = buf[:c]
            if fp32:
                torch.mm(h, weight.t(), out=b)  # logits, straight into the workspace
            else:
                b.copy_(h @ weight.t())  # logits in the compute dtype, softmax in fp32
            target_logit = b.gather(1, y)
            row_max = b.amax(1, keepdim=True)
            b.sub_(row_max).exp_()
            row_sum = b.sum(1, keepdim=True)
            # -log softmax(x)[y] = log(sum exp(x - max)) + max - x[y]
            total += (row_sum.log() + row_max - target_logit).sum()
            if needs_grad:
                # d(mean CE)/d(logits) = (softmax - onehot) / n, built in place
                b.mul_(row_sum.reciprocal_().mul_(inv_n))
                b.scatter_add_(1, y, torch.full_like(y, -inv_n, dtype=b.dtype))
                g = b if fp32 else b.to(hidden.dtype)
                torch.mm(g, weight, out=grad_h[s : s + c])
                if need_w and fp32:
                    grad_w.addmm_(g.t(), h, beta=float(s > 0))  # in place; beta=0 ignores the empty buffer
                elif need_w:
                    part = g.t() @ h
                    grad_w.copy_(part) if s == 0 else grad_w.add_(part)
        # Gradients are intermediate results, kept on ctx (not save_for_backward) so backward can hand them over
        # and drop its own reference: autograd then adopts them as .grad without a (V, H) copy.
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if need_w else None) if needs_grad else None
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError(
                "backward ran twice through fused_linear_cross_entropy (its gradients are computed once, in the "
                "forward, and handed over); recompute the loss instead of retain_graph=True"
            )
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        # scaled in place: the buffers are ours alone, so a (V, H) temporary is not needed
        grad_h.mul_(grad_out.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_out.to(grad_w.dtype))
        return grad_h, grad_w, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Causal-LM loss from final hidden states (B, T, H) and the lm_head weight (V, H), without full logits.

    Equal to ``causal_lm_loss(hidden @ weight.T, labels)``; positions whose target is -100 are skipped entirely.
    """
    targets = shift_labels(labels).reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    if keep.numel() == 0:  # same value as F.cross_entropy's mean over nothing (NaN), and like it zero gradients
        return hidden.sum() * 0.0 + weight.sum() * 0.0 + float("nan")
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)  # (N, H)
    if torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dt), weight.to(dt)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets.index_select(0, keep), chunk_size)


def check_causal_lm_labels(labels: torch.Tensor, vocab_size: int) -> None:
    """Causal-LM labels must be token ids in [0, vocab_size) or -100; anything else is a ``ValueError`` naming the
    first bad value and where it is (instead of cross-entropy's IndexError on CPU or a device-side assert on CUDA).

    Reads the values, so the callers only run it on CPU tensors (free there): the causal-LM head for CPU labels and
    :class:`~phi3_lightning.modules.CausalLMModule` on each batch while it is still on the host (no device sync)."""
    if torch.compiler.is_compiling():
        return
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        value = int(labels[tuple(where)])
        pos = f"row {where[0]}, position {where[1]}" if len(where) == 2 else f"index {tuple(where)}"
        raise ValueError(
            f"labels hold {value} ({pos}), outside the vocabulary [0, vocab_size={vocab_size}); labels are the "
            f"token ids to predict (the input_ids, unshifted): use ids below {vocab_size} and -100 for positions "
            "without a target"
        )


def _check_label_range(labels: torch.Tensor, num_labels: int, what: str) -> None:
    """Class ids must lie in [0, num_labels) (or be -100); out-of-range ids would index garbage or crash."""
    if torch.compiler.is_compiling():
        return
    valid = labels[labels != IGNORE_INDEX]
    if valid.numel():
        lo, hi = torch.stack(torch.aminmax(valid)).tolist()
        if lo < 0 or hi >= num_labels:
            raise ValueError(
                f"{what} {hi if hi >= num_labels else lo} is outside [0, {num_labels}); "
                "set num_labels to cover every class (use -100 to ignore an item)"
            )


def _check_probability_targets(labels: torch.Tensor) -> None:
    """Multi-label BCE targets are probabilities: each in [0, 1] (soft targets allowed; there is no ignore value)."""
    if torch.compiler.is_compiling() or not labels.numel():
        return
    rows = labels.reshape(labels.shape[0], -1)  # (B, num_labels)
    bad = ~((rows >= 0) & (rows <= 1))  # NaN included
    if bool(bad.any()):
        i, j = bad.nonzero()[0].tolist()
        value = float(rows[i, j])
        raise ValueError(
            f"multi-label target {value} (example {i}, label {j}) is outside [0, 1]; multi-label targets are "
            "probabilities (1 = the label applies, 0 = not; soft values in between), with no ignore value like -100"
        )


def infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    """The problem type of labels when none is configured (transformers' rule): one output -> regression; integer
    labels -> single-label; float labels over several outputs -> multi-label. The loss and the metrics both use it."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_labels: int, problem_type: str | None
) -> tuple[torch.Tensor, str]:
    """(B, num_labels) pooled logits -> loss, and the problem type used (:func:`infer_problem_type` when None)."""
    if problem_type is None:
        problem_type = infer_problem_type(num_labels, labels)
    if problem_type == "regression":
        labels = labels.to(logits.dtype)
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze()), problem_type
        return F.mse_loss(logits, labels), problem_type
    if problem_type == "single_label_classification":
        _check_label_range(labels, num_labels, "label")
        return F.cross_entropy(
            logits.float().view(-1, num_labels), labels.view(-1), ignore_index=IGNORE_INDEX
        ), problem_type
    _check_probability_targets(labels)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.to(torch.float32)), problem_type


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Mean cross-entropy over tokens whose label is not -100."""
    _check_label_range(labels, num_labels, "token label")
    return F.cross_entropy(logits.float().view(-1, num_labels), labels.view(-1), ignore_index=IGNORE_INDEX)
