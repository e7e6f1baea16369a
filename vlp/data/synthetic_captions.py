"""Captions of the synthetic shapes (vlp.data.synthetic): varied true captions, the spatial relation
of two objects, and false captions with the same words (hard negatives)."""

import re

_EDGE_PHRASES = {"top": "at the top", "bottom": "at the bottom", "left": "on the left",
                 "right": "on the right", "center": "in the center"}
_FRAMES = ("{}.", "a photo of {}.", "a picture of {}.", "an image showing {}.", "an image of {}.")


def _noun_phrase(rng, obj, determiner="a", position_p=0.0):
    """E.g. "a large red circle in the top left"; size and position are mentioned at random."""
    words = [obj["colour"], obj["shape"]]
    if rng.random() < 0.5:
        words.insert(0, "big" if obj["size"] == "large" and rng.random() < 0.25 else obj["size"])
    if determiner == "a":
        determiner = "an" if words[0][0] in "aeiou" else "a"
    phrase = f"{determiner} {' '.join(words)}"
    if rng.random() < position_p:
        name = obj["position"]
        phrase += " " + _EDGE_PHRASES.get(name, f"in the {name}")
    return phrase


def relation_of(a, b):
    """A spatial relation of a to b that is clearly true, or None when they are diagonal."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if abs(dx) >= 2 * abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    if abs(dy) >= 2 * abs(dx):
        return "above" if dy < 0 else "below"
    return None


_OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of",
             "above": "below", "below": "above"}


def _article(words):
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def relation_caption(a, b, relation):
    return f"{_article(a['colour'] + ' ' + a['shape'])} {relation} {_article(b['colour'] + ' ' + b['shape'])}."


def hard_negatives(a, b, relation):
    """Captions with the words of the true one that are false for the image (ARO/SugarCrepe-style)."""
    swapped_colours = dict(a, colour=b["colour"]), dict(b, colour=a["colour"])
    return [relation_caption(*swapped_colours, relation),  # colours swapped
            relation_caption(a, b, _OPPOSITE[relation]),  # relation reversed
            relation_caption(b, a, relation)]  # objects swapped


def _caption(rng, objects, background, relation_captions=False):
    """Natural-language caption naming every object's colour and shape; relation_captions: two
    objects in a clear relation are always captioned with it."""
    suffix = f" on a {rng.choice([background, 'plain'])} background" if rng.random() < 0.25 else ""
    if len(objects) == 1:
        determiner = rng.choice(["a", "one", "a single"], p=[0.6, 0.2, 0.2])
        phrase = _noun_phrase(rng, objects[0], determiner, position_p=0.5)
        return rng.choice(_FRAMES).format(phrase + suffix)
    a, b = (objects[i] for i in rng.permutation(2))
    relation = relation_of(a, b)
    stated = 1.0 if relation_captions else 0.5  # a clear relation is stated this often, or in 1/3 of the rest
    form = 0 if relation and rng.random() < stated else rng.integers(3)
    if form == 0 and relation:
        return f"{_noun_phrase(rng, a)} {relation} {_noun_phrase(rng, b)}."
    pa, pb = _noun_phrase(rng, a, position_p=0.3), _noun_phrase(rng, b, position_p=0.3)
    if form == 1:
        return f"two shapes: {pa} and {pb}{suffix}."
    return rng.choice(_FRAMES).format(f"{pa} and {pb}{suffix}")


SAYS_WHERE = re.compile(r"\b(left|right|above|below|top|bottom|center)\b")


def _identity(obj):
    return {key: obj[key] for key in ("colour", "shape", "size")}


def caption_with_negatives(rng, objects, background, relation_captions=False):
    """A caption, and for two objects the same sentence with the colours swapped, with the
    positions swapped and with the objects swapped in place (where it says where things are, or
    it would stay true), each where that changes it: false for the image, the same names.

    relation_captions: a caption that states the relation gets no colours-swapped false caption.
    A fusion that learns the colour swaps first learns them without where the objects are, and
    then did not learn the relations for 800 steps and more; learning both from the start, it
    learns them together (BENCHMARKS.md). The colours stay bound through the relations and the
    in-batch ITM negatives.
    """
    state = rng.bit_generator.state
    caption = _caption(rng, objects, background, relation_captions)
    if len(objects) == 1:
        return caption, None
    after = rng.bit_generator.state
    a, b = objects
    variants = [(dict(a, colour=b["colour"]), dict(b, colour=a["colour"])),
                (dict(a, x=b["x"], y=b["y"], position=b["position"]), dict(b, x=a["x"], y=a["y"], position=a["position"])),
                (dict(a, **_identity(b)), dict(b, **_identity(a)))]
    negatives = []
    if relation_captions and SAYS_WHERE.search(caption):
        variants = variants[1:]
    for variant in variants:
        rng.bit_generator.state = state  # the same choices of words and order
        negative = _caption(rng, list(variant), background, relation_captions)
        if variant is variants[-1] and not SAYS_WHERE.search(negative):
            continue
        if negative != caption and negative not in negatives:
            negatives.append(negative)
    rng.bit_generator.state = after
    return caption, negatives or None
