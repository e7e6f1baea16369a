"""Questions with answers about a synthetic image, for VQA (the `qa` key of the sample json).

Every question whose answer the image determines is asked: the colour of each uniquely shaped
object, the shape of each uniquely coloured one, how many shapes there are and, for two objects
in a clear left/right or above/below relation, which one is on the left or on top. The
`answer_type` names what is asked (colour, shape, count, spatial), so accuracy splits by it.
"""

COUNT_WORDS = ("zero", "one", "two")
_SIDE = {"to the left of": ("left", "on the left"), "above": ("top", "on top")}


def questions(objects: list[dict], relation) -> list[dict]:
    """[{"question", "answers", "answer_type"}, ...] for objects with colour, shape, x and y.

    Args:
        objects: the rendered objects (one or two).
        relation: (a, b) -> "to the left of" | "to the right of" | "above" | "below" | None,
            the clearly true relation of a to b.
    """
    qa = []
    for obj in objects:
        if sum(o["shape"] == obj["shape"] for o in objects) == 1:
            qa.append(_qa(f"what colour is the {obj['shape']}?", obj["colour"], "colour"))
        if sum(o["colour"] == obj["colour"] for o in objects) == 1:
            qa.append(_qa(f"what shape is the {obj['colour']} object?", obj["shape"], "shape"))
    qa.append(_qa("how many shapes are there?", COUNT_WORDS[len(objects)], "count"))
    if len(objects) == 2:
        a, b = objects
        if relation(a, b) in ("to the right of", "below"):
            a, b = b, a
        side = _SIDE.get(relation(a, b))
        if side and a["shape"] != b["shape"]:
            qa.append(_qa(f"which shape is {side[1]}?", a["shape"], "spatial"))
        elif side:
            qa.append(_qa(f"what colour is the shape {side[1]}?", a["colour"], "spatial"))
    return qa


def _qa(question: str, answer: str, answer_type: str) -> dict:
    return {"question": question, "answers": [answer], "answer_type": answer_type}
