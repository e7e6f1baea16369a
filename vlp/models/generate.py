"""Caption generation from a CoCa VLPModel: beam search, nucleus (top-p) sampling and greedy decoding.

open_clip's `CoCa.generate` would be the natural choice, but its beam search imports
`transformers.BeamSearchScorer`, which transformers 5 removed; these ~80 lines keep the same
options (beam search, top-p, temperature, minimum length) without pinning transformers < 5.
"""
from typing import Optional

import open_clip
import torch

from vlp.models.caption import encode_image_tokens, text_states, vocabulary_logits

SOT_ID, EOT_ID = 49406, 49407  # open_clip's BPE <start_of_text>, <end_of_text>
METHODS = ("beam_search", "top_p", "greedy")


@torch.no_grad()
def generate(model: torch.nn.Module, images: torch.Tensor, method: str = "beam_search", *,
             max_len: int = 20, min_len: int = 2, num_beams: int = 4, top_p: float = 0.9,
             temperature: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Token ids (B, <= max_len), starting with <start_of_text>, ending at <end_of_text> or max_len.

    Args:
        model: a VLPModel with a CoCa image tower and `heads.caption`.
        images: (B, 3, H, W) preprocessed images.
        method: `beam_search` (deterministic), `top_p` (sampling) or `greedy`.
        max_len: at most this many tokens, <start_of_text> included (at most the text context length).
        min_len: <end_of_text> is forbidden before this many tokens.
        num_beams: beams per image for beam search.
        top_p: nucleus mass for top-p sampling.
        temperature: divides the logits before top-p sampling.
        generator: random generator for top-p sampling.
    """
    if method not in METHODS:
        raise ValueError(f"unknown generation method {method!r}; choose one of {', '.join(METHODS)}")
    _, image_tokens = encode_image_tokens(model, images)
    if method == "beam_search":
        return _beam_search(model, image_tokens, max_len, min_len, num_beams)
    out = torch.full((len(images), 1), SOT_ID, dtype=torch.long, device=images.device)
    done = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    while out.shape[1] < max_len and not done.all():
        logits = _next_logits(model, image_tokens, out, min_len)
        if method == "greedy":
            token = logits.argmax(-1)
        else:
            token = torch.multinomial(_nucleus(logits / temperature, top_p).softmax(-1), 1, generator=generator)[:, 0]
        token = torch.where(done, torch.full_like(token, EOT_ID), token)  # finished rows only repeat EOT
        out = torch.cat([out, token[:, None]], dim=1)
        done |= token == EOT_ID
    return out


def _next_logits(model, image_tokens, tokens, min_len):
    logits = vocabulary_logits(model, text_states(model, image_tokens, tokens)[1][:, -1]).float()  # (B, V)
    if tokens.shape[1] < min_len:
        logits[:, EOT_ID] = -float("inf")
    return logits


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with everything outside the smallest set of mass >= top_p set to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
    sorted_logits[mass_before >= top_p] = -float("inf")  # the top token always stays
    return torch.full_like(logits, -float("inf")).scatter(-1, order, sorted_logits)


def _beam_search(model, image_tokens, max_len, min_len, num_beams):
    """Per image, the finished beam with the highest mean token log-probability."""
    batch, k = image_tokens.shape[0], num_beams
    image_tokens = image_tokens.repeat_interleave(k, dim=0)  # (B*k, N, W)
    seqs = torch.full((batch * k, 1), SOT_ID, dtype=torch.long, device=image_tokens.device)
    scores = torch.full((batch, k), -float("inf"), device=image_tokens.device)
    scores[:, 0] = 0.0  # one live beam at the start, so the k beams do not start identical
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
    while seqs.shape[1] < max_len:
        logp = _next_logits(model, image_tokens, seqs, min_len).log_softmax(-1)  # (B*k, V)
        vocab = logp.shape[1]
        total = (scores.reshape(-1, 1) + logp).reshape(batch, k * vocab)
        top_scores, top_ids = total.topk(2 * k, dim=1)  # enough candidates to keep k unfinished
        next_seqs, next_scores = [], []
        for b in range(batch):
            kept = []
            for score, idx in zip(top_scores[b].tolist(), top_ids[b].tolist()):
                beam, token = divmod(idx, vocab)
                seq = torch.cat([seqs[b * k + beam], seqs.new_tensor([token])])
                if token == EOT_ID:
                    finished[b].append((score / (len(seq) - 1), seq))
                elif len(kept) < k:
                    kept.append((score, seq))
            next_seqs += [s for _, s in kept]
            next_scores.append([s for s, _ in kept])
        seqs, scores = torch.stack(next_seqs), scores.new_tensor(next_scores)
        if all(len(f) >= k for f in finished):
            break
    for b in range(batch):  # beams that reached max_len count as finished
        finished[b] += [(scores[b, i].item() / (seqs.shape[1] - 1), seqs[b * k + i]) for i in range(k)]
    best = [max(f, key=lambda pair: pair[0])[1] for f in finished]
    return torch.nn.utils.rnn.pad_sequence(best, batch_first=True, padding_value=EOT_ID)


def decode(token_ids: torch.Tensor) -> list[str]:
    """Token ids (B, L) -> captions, without the special tokens."""
    texts = [open_clip.decode(row) for row in token_ids.cpu()]
    return [t.split("<end_of_text>")[0].replace("<start_of_text>", "").strip() for t in texts]
