"""Single-process tests of vlp.losses against an explicit float64 loop and open_clip."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from vlp.losses import (
    ContrastiveLoss,
    ContrastiveOutput,
    SigmoidLoss,
    SigmoidOutput,
    contrastive_loss,
    sigmoid_loss,
)


def make_features(b=8, d=5, seed=0):
    """Unit-norm image/text features (float64, requiring grad) and a logit scale."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    scale = torch.tensor(4.0, dtype=torch.float64)
    return image.requires_grad_(), text.requires_grad_(), scale.requires_grad_()


def reference_direction(queries, keys, scale, label_smoothing):
    """Mean over query rows of the smoothed cross-entropy, one explicit log-softmax per row."""
    n = queries.shape[0]
    total = 0.0
    for i in range(n):
        row = scale * (keys @ queries[i])  # (n,)
        shifted = row - row.max()
        log_probs = shifted - torch.log(torch.exp(shifted).sum())
        target = torch.full((n,), label_smoothing / n, dtype=torch.float64)
        target[i] += 1.0 - label_smoothing
        total = total - (target * log_probs).sum()
    return total / n


def reference_accuracy(queries, keys):
    hits = [int(torch.argmax(keys @ queries[i])) == i for i in range(queries.shape[0])]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_values_match_reference(label_smoothing):
    image, text, scale = make_features()
    out = contrastive_loss(image, text, scale, label_smoothing=label_smoothing)
    image_loss = reference_direction(image, text, scale, label_smoothing)
    text_loss = reference_direction(text, image, scale, label_smoothing)
    assert not torch.isclose(image_loss, text_loss)  # a swap of directions would show
    torch.testing.assert_close(out.image_loss, image_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.text_loss, text_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, (image_loss + text_loss) / 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_gradients_match_reference(label_smoothing):
    image, text, scale = make_features()
    got = torch.autograd.grad(
        contrastive_loss(image, text, scale, label_smoothing=label_smoothing).loss,
        (image, text, scale),
    )
    ref_loss = (
        reference_direction(image, text, scale, label_smoothing)
        + reference_direction(text, image, scale, label_smoothing)
    ) / 2
    want = torch.autograd.grad(ref_loss, (image, text, scale))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_accuracy_is_image_to_text_and_detached():
    image, text, scale = make_features()
    out = contrastive_loss(image, text, scale)
    i2t, t2i = reference_accuracy(image, text), reference_accuracy(text, image)
    assert i2t != t2i and 0 < i2t < 1  # the data tells the directions apart
    assert out.accuracy.item() == pytest.approx(i2t)
    assert not out.accuracy.requires_grad


def test_matches_open_clip():
    image, text, scale = make_features(b=6, d=7, seed=1)
    ours = contrastive_loss(image, text, scale).loss
    theirs = ClipLoss()(image, text, scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(ours, (image, text, scale))
    want = torch.autograd.grad(theirs, (image, text, scale))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_module_uses_label_smoothing():
    image, text, scale = make_features()
    loss_fn = ContrastiveLoss(label_smoothing=0.2)
    out = loss_fn(image, text, scale)
    assert isinstance(out, ContrastiveOutput)
    torch.testing.assert_close(out.loss, contrastive_loss(image, text, scale, label_smoothing=0.2).loss)
    assert not torch.isclose(out.loss, contrastive_loss(image, text, scale).loss)


def test_float32_perfect_match():
    image = torch.eye(4)  # orthonormal pairs: a large scale drives the loss to zero
    out = contrastive_loss(image, image.clone(), torch.tensor(100.0))
    assert out.loss.dtype == torch.float32
    assert out.loss.item() < 1e-6 and out.accuracy.item() == 1.0


def make_sigmoid_inputs(b=8, d=5, seed=0):
    """make_features plus a logit bias; scale and bias leave the logits of both signs."""
    image, text, scale = make_features(b, d, seed)
    return image, text, scale, torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)


def reference_sigmoid(image, text, scale, bias):
    """Sum over every pair of -log(sigmoid(label * logit)), one explicit term each, over B."""
    b = image.shape[0]
    total = 0.0
    for i in range(b):
        for j in range(b):
            label = 1.0 if i == j else -1.0
            logit = scale * torch.dot(image[i], text[j]) + bias
            total = total + torch.log1p(torch.exp(-label * logit))
    return total / b


def test_sigmoid_values_and_gradients_match_reference():
    inputs = make_sigmoid_inputs()
    out = sigmoid_loss(*inputs)
    want = reference_sigmoid(*inputs)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(out.loss, inputs)
    want_grads = torch.autograd.grad(want, inputs)
    for name, g, w in zip(("image", "text", "scale", "bias"), got_grads, want_grads):
        assert w.abs().max() > 1e-3, name  # every input matters
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


def test_sigmoid_accuracy_counts_positive_matching_logits():
    image, text, scale, bias = make_sigmoid_inputs()
    out = sigmoid_loss(image, text, scale, bias)
    logits = scale * (image * text).sum(dim=1) + bias  # (B,) matching pairs only
    want = (logits > 0).double().mean().item()
    assert 0 < want < 1  # the data has matches on both sides of the boundary
    assert out.accuracy.item() == pytest.approx(want)
    assert not out.accuracy.requires_grad


def test_sigmoid_matches_open_clip():
    inputs = make_sigmoid_inputs(b=6, d=7, seed=1)
    ours = sigmoid_loss(*inputs).loss
    theirs = SigLipLoss()(*inputs)  # takes the exponentiated scale, like ours
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(ours, inputs)
    want = torch.autograd.grad(theirs, inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_sigmoid_module():
    inputs = make_sigmoid_inputs()
    out = SigmoidLoss()(*inputs)
    assert isinstance(out, SigmoidOutput)
    torch.testing.assert_close(out.loss, sigmoid_loss(*inputs).loss, rtol=0, atol=0)


def test_sigmoid_float32_extreme_logits():
    image = torch.eye(4)  # orthonormal pairs: non-matching logits are all exactly the bias
    scale, bias = torch.tensor(100.0), torch.tensor(-50.0)
    out = sigmoid_loss(image, image.clone(), scale, bias)  # matching logits +50
    assert out.loss.dtype == torch.float32
    assert 0 <= out.loss.item() < 1e-6 and out.accuracy.item() == 1.0
    out = sigmoid_loss(image, -image, scale, bias)  # matching logits -150: sigmoid underflows
    assert out.loss.item() == pytest.approx(150.0) and out.accuracy.item() == 0.0
