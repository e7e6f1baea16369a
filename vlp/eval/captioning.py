"""Caption metrics: corpus BLEU-4 (torchmetrics), CIDEr-D (pycocoevalcap) and attribute accuracy."""
import re
from typing import Sequence

from pycocoevalcap.cider.cider import Cider
from torchmetrics.functional.text import bleu_score


def caption_metrics(captions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """`caption_bleu4` and `caption_cider` of generated captions against their reference captions.

    Both sides should be tokenised alike (here: open_clip's tokenizer, lower case, punctuation split).

    Args:
        captions: one generated caption per image.
        references: one or more reference captions per image.
    """
    if len(captions) != len(references):
        raise ValueError(f"{len(captions)} captions but {len(references)} reference lists")
    if not captions:
        return {"caption_bleu4": 0.0, "caption_cider": 0.0}
    bleu = bleu_score(list(captions), [list(r) for r in references], n_gram=4)
    # CIDEr weights n-grams by their document frequency over the references: a corpus-level score
    cider, _ = Cider().compute_score({i: list(r) for i, r in enumerate(references)},
                                     {i: [c] for i, c in enumerate(captions)})
    return {"caption_bleu4": float(bleu), "caption_cider": float(cider)}


def attribute_accuracy(captions: Sequence[str], labels: Sequence[int], classnames: Sequence[str]) -> float:
    """Share of captions that name exactly their image's class words (e.g. "red" and "circle").

    A caption passes when the set of class-name words it contains (any class's: all colours and
    shapes of the synthetic data) equals the words of its own class name, so listing every colour
    does not pass. Uniformly random (colour, shape) guesses on the synthetic data score 1/32.
    """
    vocabulary = {word for name in classnames for word in name.split()}
    hits = [set(re.findall(r"[a-z]+", caption.lower())) & vocabulary == set(classnames[label].split())
            for caption, label in zip(captions, labels)]
    return sum(hits) / len(hits) if hits else 0.0
