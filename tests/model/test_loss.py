"""The fused linear + cross-entropy loss and the causal-LM loss conventions. (Each component in isolation, against transformers' own component or the formula.)"""

import pytest
import torch

from phi3_lightning.model.heads import Phi3ForCausalLM, ignore_targets_after_padding
from phi3_lightning.model.loss import causal_lm_loss, fused_linear_cross_entropy

from .shapes import config


def test_fused_linear_cross_entropy_equals_reference_and_grads():
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = -100
    ref = causal_lm_loss(h @ w.T, labels)
    gh, gw = torch.autograd.grad(ref, (h, w))
    fused = fused_linear_cross_entropy(h, w, labels, chunk_size=4)
    fh, fw = torch.autograd.grad(fused, (h, w))
    assert torch.allclose(fused, ref, rtol=1e-6)
    assert torch.allclose(fh, gh, atol=1e-6) and torch.allclose(fw, gw, atol=1e-6)


def test_training_loss_path_equals_logits_path():
    model = Phi3ForCausalLM(config("phi-4-mini"))  # tied embeddings: gradient reaches the embedding twice
    x = torch.randint(3, 97, (2, 12))
    a = model(x, labels=x).loss
    ga = torch.autograd.grad(a, model.model.embed_tokens.weight)[0]
    b = model(x, labels=x, return_logits=False).loss
    gb = torch.autograd.grad(b, model.model.embed_tokens.weight)[0]
    assert torch.allclose(a, b, rtol=1e-6) and torch.allclose(ga, gb, atol=1e-6)


def test_targets_after_padding_are_ignored():
    labels = torch.tensor([[-100, -100, 5, 6], [7, 8, -100, -100]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]])
    assert ignore_targets_after_padding(labels, mask).tolist() == [[-100, -100, -100, 6], [7, 8, -100, -100]]


def test_fused_loss_with_frozen_weight_gives_hidden_grad_only():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(20, 8)  # frozen
    labels = torch.randint(0, 20, (2, 5))
    ref_gh = torch.autograd.grad(causal_lm_loss(h @ w.T, labels), h)[0]
    gh = torch.autograd.grad(fused_linear_cross_entropy(h, w, labels, chunk_size=3), h)[0]
    assert torch.allclose(gh, ref_gh, atol=1e-6)


def test_fused_loss_bf16_and_no_grad_paths():
    torch.manual_seed(0)
    h32 = torch.randn(2, 9, 16)
    w32 = torch.randn(40, 16) * 0.5
    labels = torch.randint(0, 40, (2, 9))
    h, w = h32.bfloat16().requires_grad_(), w32.bfloat16().requires_grad_()
    ref = causal_lm_loss(h @ w.T, labels)  # logits in bf16, softmax in fp32: what the fused path computes
    gh, gw = torch.autograd.grad(ref, (h, w))
    fused = fused_linear_cross_entropy(h, w, labels, chunk_size=5)
    fh, fw = torch.autograd.grad(fused, (h, w))
    assert fused.dtype == torch.float32 and torch.allclose(fused, ref, rtol=1e-5)
    assert fh.dtype == torch.bfloat16 and fw.dtype == torch.bfloat16
    assert torch.allclose(fh.float(), gh.float(), atol=2e-2, rtol=2e-2)
    assert torch.allclose(fw.float(), gw.float(), atol=2e-2, rtol=2e-2)
    with torch.no_grad():  # evaluation: loss only, chunk larger than the number of targets
        plain = fused_linear_cross_entropy(h32, w32, labels, chunk_size=1000)
    assert torch.allclose(plain, causal_lm_loss(h32 @ w32.T, labels), rtol=1e-6)


def test_fused_loss_scales_by_upstream_grad_and_refuses_a_second_backward():
    torch.manual_seed(0)
    h = torch.randn(2, 6, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    labels = torch.randint(0, 30, (2, 6))
    gh, gw = torch.autograd.grad(3.0 * causal_lm_loss(h @ w.T, labels), (h, w))
    fh, fw = torch.autograd.grad(3.0 * fused_linear_cross_entropy(h, w, labels, chunk_size=4), (h, w))
    assert torch.allclose(fh, gh, atol=1e-6) and torch.allclose(fw, gw, atol=1e-6)
    loss = fused_linear_cross_entropy(h, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("bad", [512, -5, 10**6])
@pytest.mark.parametrize("return_logits", [True, False])
def test_causal_lm_labels_outside_the_vocabulary_are_a_clear_error(bad, return_logits):
    # was IndexError "Target 512 is out of bounds" on CPU (a device-side assert on CUDA)
    model = Phi3ForCausalLM(config("phi-4", vocab_size=512))
    x = torch.randint(0, 512, (2, 8))
    labels = x.clone()
    labels[0, :2] = -100  # the ignore index stays allowed
    labels[1, 5] = bad
    with pytest.raises(
        ValueError,
        match=rf"labels hold {bad} \(row 1, position 5\), outside the vocabulary "
        r"\[0, vocab_size=512\); .*-100",
    ):
        model(x, labels=labels, return_logits=return_logits)
    labels[1, 5] = 511
    assert torch.isfinite(model(x, labels=labels, return_logits=return_logits).loss)


def test_fused_loss_trains_after_a_call_under_inference_mode():
    """Trainer.validate runs under inference_mode; its CPU workspace must stay usable by a later fit in the same
    process (it was an inference tensor: 'Inplace update to inference tensor outside InferenceMode')."""
    from phi3_lightning.model.loss import fused_linear_cross_entropy, release_workspace

    release_workspace()
    torch.manual_seed(0)
    h, w = torch.randn(1, 8, 16), torch.randn(50, 16)
    y = torch.randint(0, 50, (1, 8))
    with torch.inference_mode():
        expected = fused_linear_cross_entropy(h, w, y)
    h.requires_grad_()
    loss = fused_linear_cross_entropy(h, w, y)
    loss.backward()
    assert torch.allclose(loss.detach(), expected)
    assert h.grad is not None and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("bad", [-100.0, 1.5, -0.25, float("nan")])
def test_multi_label_targets_outside_0_1_are_a_clear_error(bad):
    # BCE's targets are probabilities: -100 (no "ignore" for multi-label BCE) or 1.5 gave a finite, meaningless
    # loss, and the metrics counted the target as a negative
    from phi3_lightning.model.loss import sequence_classification_loss

    logits = torch.randn(3, 4)
    labels = torch.tensor([[0.0, 1.0, 0.3, 0.9]] * 3)
    labels[2, 1] = bad
    with pytest.raises(ValueError, match=rf"multi-label target {bad} \(example 2, label 1\) is outside \[0, 1\]"):
        sequence_classification_loss(logits, labels, 4, "multi_label_classification")
    labels[2, 1] = 1.0  # soft targets inside [0, 1] are fine
    loss, _ = sequence_classification_loss(logits, labels, 4, "multi_label_classification")
    assert torch.allclose(loss, torch.nn.functional.binary_cross_entropy_with_logits(logits, labels))
