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


def naive_contrastive(image, text, scale, label_smoothing=0.0):
    """The full-logits InfoNCE (what autograd used to keep whole), for comparisons."""
    logits = scale * image @ text.T  # (B, B)
    labels = torch.arange(image.shape[0])
    return (
        F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)
    ) / 2


def naive_sigmoid(image, text, scale, bias):
    """The full-logits sigmoid loss, for comparisons."""
    logits = scale * image @ text.T + bias  # (B, B)
    labels = 2 * torch.eye(image.shape[0], dtype=logits.dtype) - 1  # (B, B)
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


@pytest.mark.parametrize("chunk_size", [1, 3, 8])  # 3 does not divide B = 8
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_chunks_match_reference(chunk_size, label_smoothing):
    image, text, scale = make_features()
    out = contrastive_loss(
        image, text, scale, label_smoothing=label_smoothing, chunk_size=chunk_size
    )
    want = (
        reference_direction(image, text, scale, label_smoothing)
        + reference_direction(text, image, scale, label_smoothing)
    ) / 2
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    assert out.accuracy.item() == pytest.approx(reference_accuracy(image, text))
    got = torch.autograd.grad(out.loss, (image, text, scale))
    for g, w in zip(got, torch.autograd.grad(want, (image, text, scale))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_sigmoid_chunks_match_reference(chunk_size):
    inputs = make_sigmoid_inputs()
    out = sigmoid_loss(*inputs, chunk_size=chunk_size)
    want = reference_sigmoid(*inputs)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(out.loss, inputs), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_chunks_as_rank_one_of_two(monkeypatch):
    """Rank 1's chunked loss, labels offset by B, against its rows of the full logits."""
    image, text, scale = make_features(b=10, seed=2)
    local = slice(5, 10)  # rank 1 of 2, B = 5
    monkeypatch.setattr("vlp.losses.world_info", lambda: (1, 2))
    # the other rank's features as constants, as all_gather_with_grad gives them
    monkeypatch.setattr(
        "vlp.losses.all_gather_with_grad",
        lambda x: torch.cat([torch.cat([image, text], dim=1)[:5].detach(), x]),
    )
    out = contrastive_loss(image[local], text[local], scale, label_smoothing=0.1, chunk_size=2)
    labels = torch.arange(5, 10)
    all_image, all_text = (torch.cat([t[:5].detach(), t[local]]) for t in (image, text))
    logits_per_image = scale * image[local] @ all_text.T  # (B, 2B)
    want = (
        F.cross_entropy(logits_per_image, labels, label_smoothing=0.1)
        + F.cross_entropy(scale * text[local] @ all_image.T, labels, label_smoothing=0.1)
    ) / 2
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    hits = logits_per_image.argmax(dim=1) == labels
    assert 0 < hits.sum() < 5 and out.accuracy.item() == pytest.approx(hits.double().mean().item())
    got = torch.autograd.grad(out.loss, (image, text, scale))
    for g, w in zip(got, torch.autograd.grad(want, (image, text, scale))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_sigmoid_chunks_with_ring_blocks(monkeypatch):
    """Rank 0's chunked loss over its own block and another rank's (negatives only)."""
    image, text, scale, bias = make_sigmoid_inputs(b=10, seed=2)
    monkeypatch.setattr("vlp.losses.ring_exchange_with_grad", lambda x: iter([text[5:]]))
    out = sigmoid_loss(image[:5], text[:5], scale, bias, chunk_size=2)
    labels = 2 * torch.eye(5, 10, dtype=torch.float64) - 1  # (B, 2B)
    want = -F.logsigmoid(labels * (scale * image[:5] @ text.T + bias)).sum() / 5  # 2B texts
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    inputs = (image, text, scale, bias)
    for g, w in zip(torch.autograd.grad(out.loss, inputs), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def saved_sizes(loss_fn):
    """Number of elements of every tensor autograd saves while loss_fn() runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return sizes


def test_autograd_saves_no_batch_by_batch_matrix():
    b, d = 512, 16
    image, text, scale = (t.float() for t in make_features(b, d))
    bias = torch.tensor(-1.5, requires_grad=True)
    naive = saved_sizes(lambda: naive_contrastive(image, text, scale))
    assert max(naive) == b * b  # the hooks do see what the full-logits loss keeps
    for fn in (
        lambda: contrastive_loss(image, text, scale, label_smoothing=0.1, chunk_size=128),
        lambda: sigmoid_loss(image, text, scale, bias, chunk_size=128),
    ):
        sizes = saved_sizes(fn)
        assert sizes and max(sizes) <= b * d  # features and per-row statistics only


@pytest.mark.parametrize("loss", ["contrastive", "sigmoid"])
def test_bfloat16_autocast_matches_naive(loss):
    """The backward recomputes logits as the forward's autocast matmul made them."""
    image, text, scale, bias = (
        t.float().detach().requires_grad_() for t in make_sigmoid_inputs(64, 16)
    )
    scale.data.fill_(50.0)  # bf16 logits err by ~0.1: a float32 recompute breaks the softmax
    inputs = (image, text, scale, bias) if loss == "sigmoid" else (image, text, scale)
    ours = {"contrastive": contrastive_loss, "sigmoid": sigmoid_loss}[loss]
    naive = {"contrastive": naive_contrastive, "sigmoid": naive_sigmoid}[loss]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(*inputs, chunk_size=24).loss
        want = naive(*inputs)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-2, atol=1e-2)  # bf16: 3 digits
    for g, w in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        assert g.dtype == w.dtype == torch.float32
        assert (g - w).norm() / w.norm() < 1e-2
