"""The objectives trained through a fusion transformer: image-text matching and masked language modelling.

- ITM (ALBEF): the fused [CLS] of every positive pair, of each image with a hard negative text and
  of each text with a hard negative image (and of each image with the false captions its sample
  may carry) is classified match / no match. Negatives are drawn
  from the softmax of the contrastive similarity over the **global** batch (all ranks) with the
  positive, and any pair with the positive's exact caption, masked. Token sequences are gathered
  with gradient, so a rank's negative may come from, and send gradient to, another rank: the
  loss and gradients equal one process holding the global batch. Gathering costs
  W * B * (N * W_img + L * W_txt) activations per rank (ViT-B/32, 224 px, B=256, 64 ranks:
  about 6 GB in bf16); `across_ranks=False` mines within the local batch instead.
- MLM (BERT): 15% of the non-special text tokens are chosen; 80% become [MASK], 10% a random
  token, 10% stay; the fused text tokens predict the originals.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.distributed import all_gather_no_grad, all_gather_with_grad, world_info
from vlp.models.model import VLPModel, VLPOutput

IGNORE = -100  # label of the tokens MLM does not predict (F.cross_entropy's ignore_index)


class FusionLossOutput(NamedTuple):
    loss: Tensor  # scalar
    accuracy: Tensor  # scalar: share of correct predictions (ITM pairs or masked tokens)


def mask_tokens(tokens: Tensor, mask_token_id: int, special_ids: list[int], vocab_size: int,
                probability: float = 0.15, generator: torch.Generator = None) -> tuple[Tensor, Tensor]:
    """BERT's masking: returns (masked tokens (B, L), labels (B, L): the original at chosen positions,
    IGNORE elsewhere). Special tokens (padding, start, end) are never chosen nor drawn as random
    replacements. `vocab_size` counts the real tokens ([MASK] excluded)."""
    special = torch.tensor(special_ids, device=tokens.device)
    draw = torch.rand(tokens.shape, device=tokens.device, generator=generator)  # (B, L)
    chosen = (draw < probability) & ~torch.isin(tokens, special)
    labels = torch.where(chosen, tokens, IGNORE)
    # reuse the draw: within the chosen, its position below `probability` splits 80/10/10
    share = draw / probability
    masked = torch.where(chosen & (share < 0.8), mask_token_id, tokens)
    randomise = chosen & (share >= 0.8) & (share < 0.9)
    ordinary = torch.arange(vocab_size, device=tokens.device)
    ordinary = ordinary[~torch.isin(ordinary, special)]
    random_ids = ordinary[torch.randint(len(ordinary), tokens.shape, device=tokens.device, generator=generator)]
    return torch.where(randomise, random_ids, masked), labels


def masked_language_modelling(model: VLPModel, out: VLPOutput, tokens: Tensor, probability: float = 0.15,
                              generator: torch.Generator = None) -> FusionLossOutput:
    """MLM loss of `model` on a batch whose forward output is `out` (image tokens reused)."""
    masked, labels = mask_tokens(tokens, model.mask_token_id, model.special_token_ids, model.text_vocab_size,
                                 probability, generator)
    fused = model.fusion(out.image_tokens, *model.encode_text_tokens(masked))
    chosen = labels != IGNORE  # (B, L)
    logits = model.mlm_logits(fused.text[chosen])  # (M, V)
    targets = labels[chosen]
    if not len(targets):  # no token chosen (tiny batch): zero, still connected to the graph
        return FusionLossOutput(logits.sum() * 0.0, logits.new_zeros(()))
    loss = F.cross_entropy(_at_least_float32(logits), targets)
    return FusionLossOutput(loss, (logits.argmax(dim=1) == targets).float().mean())


def caption_hashes(tokens: Tensor) -> Tensor:
    """(B, L) token ids -> (B,) int64 keys, equal for equal captions (collisions: ~2^-64)."""
    weights = torch.randint(-2**62, 2**62, (tokens.shape[1],), generator=torch.Generator().manual_seed(0))
    return (tokens.long() * weights.to(tokens.device)).sum(dim=1)  # wraps around: a hash


def near_positives(cosines: Tensor, positive_cos: Tensor, ratio: float) -> Tensor:
    """(B, M) True where a candidate's cosine (B, M) exceeds `ratio` times the positive's (B,),
    taken as 0 when negative (NV-Retriever's TopK-PercPos); the positive itself is masked elsewhere."""
    return cosines > ratio * positive_cos.clamp(min=0)[:, None]


def sample_negatives(similarity: Tensor, positive: Tensor, excluded: Tensor, uniform: Tensor) -> Tensor:
    """Draws one negative per row from softmax(similarity) with the positive and `excluded` masked.

    Args:
        similarity: (B, M) scaled similarities of each query to all M candidates.
        positive: (B,) index of each query's positive candidate.
        excluded: (B, M) True where a candidate must not be drawn (the same caption).
        uniform: (B,) uniform [0, 1) numbers; inverse-CDF sampling with them makes the draw a
            function of the inputs, the same on every rank.

    Returns:
        (B,) candidate indices. A row with no admissible candidate draws uniformly among the others.
    """
    weights = similarity.float().softmax(dim=1).masked_fill(excluded, 0.0)
    rows = torch.arange(len(weights), device=weights.device)
    weights[rows, positive] = 0.0
    fallback = torch.ones_like(weights)
    fallback[rows, positive] = 0.0
    weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, fallback)
    cdf = weights.cumsum(dim=1)  # (B, M)
    picks = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).squeeze(1)
    return picks.clamp(max=weights.shape[1] - 1)


def image_text_matching(model: VLPModel, out: VLPOutput, tokens: Tensor, seed: int, across_ranks: bool = True,
                        false_negative_ratio: Optional[float] = None,
                        data_negatives: Optional[tuple[Tensor, Tensor]] = None) -> FusionLossOutput:
    """ITM loss over B positives, B (image, negative text) and B (negative image, text) pairs.

    Args:
        model: a VLPModel with fusion.
        out: its forward output on (images, tokens), token sequences included.
        tokens: (B, L) the batch's token ids (to mask negatives with the positive's caption).
        seed: seeds the draw; give every rank the same seed at a step (e.g. seed + step).
        across_ranks: mine negatives from the global batch; False: from this rank's batch only.
        false_negative_ratio: positive-aware mining (NV-Retriever's TopK-PercPos): candidates whose
            cosine exceeds this share of the positive's are not drawn, as likely descriptions of the
            same content (data sets with many near-duplicate captions); None: ALBEF's plain draw.
        data_negatives: (M, L) token ids of captions known to be false for their image, and (M,) the
            image each belongs to (the shards' `negatives` field): M more no-match pairs.
    """
    rank, world = world_info() if across_ranks else (0, 1)
    gather = all_gather_with_grad if world > 1 else _identity
    gather_ids = all_gather_no_grad if world > 1 else _identity
    B = len(tokens)
    with torch.no_grad():
        all_image, all_text = gather_ids(out.image_features), gather_ids(out.text_features)  # (W*B, D)
        keys = caption_hashes(tokens)
        same_caption = keys[:, None] == gather_ids(keys)[None, :]  # (B, W*B)
        positive = rank * B + torch.arange(B, device=tokens.device)
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
        uniform = torch.rand(2, world * B, device=tokens.device, generator=generator)[:, rank * B:(rank + 1) * B]
        i2t, t2i = out.image_features @ all_text.T, out.text_features @ all_image.T  # (B, W*B) cosines
        excluded_texts, excluded_images = same_caption, same_caption
        if false_negative_ratio is not None:
            positive_cos = (out.image_features * out.text_features).sum(dim=1)  # (B,)
            excluded_texts = same_caption | near_positives(i2t, positive_cos, false_negative_ratio)
            excluded_images = same_caption | near_positives(t2i, positive_cos, false_negative_ratio)
        scale = out.logit_scale.detach()
        negative_text = sample_negatives(scale * i2t, positive, excluded_texts, uniform[0])
        negative_image = sample_negatives(scale * t2i, positive, excluded_images, uniform[1])
        all_padding = gather_ids(out.text_padding.to(torch.uint8)).bool()  # gloo gathers no bools
        all_cls = gather_ids(out.text_cls_index)
    all_image_tokens, all_text_tokens = gather(out.image_tokens), gather(out.text_tokens)
    image = torch.cat([out.image_tokens, out.image_tokens, all_image_tokens[negative_image]])  # (3B, N, W_img)
    text = torch.cat([out.text_tokens, all_text_tokens[negative_text], out.text_tokens])  # (3B, L, W_txt)
    padding = torch.cat([out.text_padding, all_padding[negative_text], out.text_padding])  # (3B, L)
    cls = torch.cat([out.text_cls_index, all_cls[negative_text], out.text_cls_index])  # (3B,)
    if data_negatives is not None:
        negative_tokens, owner = data_negatives
        image = torch.cat([image, out.image_tokens[owner]])  # (3B+M, N, W_img)
        text, padding, cls = (torch.cat(pair) for pair in zip((text, padding, cls),
                                                                model.encode_text_tokens(negative_tokens)))
    logits = model.heads["itm"](model.fusion(image, text, padding, cls).cls)  # (3B+M, 2)
    labels = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    labels[:B] = 1
    loss = F.cross_entropy(_at_least_float32(logits), labels)
    return FusionLossOutput(loss, (logits.argmax(dim=1) == labels).float().mean())


def itm_match_scores(model: VLPModel, image_tokens: Tensor, text_tokens: Tensor, text_padding: Tensor,
                     text_cls_index: Tensor) -> Tensor:
    """(B,) ITM match logit minus no-match logit of B (image, text) token-sequence pairs."""
    fused = model.fusion(image_tokens, text_tokens, text_padding, text_cls_index)
    logits = _at_least_float32(model.heads["itm"](fused.cls))
    return logits[:, 1] - logits[:, 0]


def _at_least_float32(x: Tensor) -> Tensor:
    """bf16 logits are upcast for the loss; float64 (tests) stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _identity(x: Tensor) -> Tensor:
    return x

