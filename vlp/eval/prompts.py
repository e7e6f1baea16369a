"""Zero-shot prompt sets: class names and templates, built in or from a user's JSON file."""
import json
from pathlib import Path
from typing import Callable, Union

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

Template = Union[str, Callable[[str], str]]
# name -> (class names in label order, templates); ImageNet's order is that of the sorted WordNet ids
BUILTIN = {"imagenet": (list(IMAGENET_CLASSNAMES), list(OPENAI_IMAGENET_TEMPLATES))}


def load_prompts(spec: str) -> tuple[list[str], list[Template]]:
    """(classnames, templates) of a built-in set (`imagenet`: open_clip's 1000 classes and 80 OpenAI
    templates) or of a JSON file `{"classnames": [...], "templates": ["a photo of a {}.", ...]}`.

    Raises:
        FileNotFoundError: `spec` is neither a built-in name nor a file.
        ValueError: the file lacks `classnames` or `templates`.
    """
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"zero-shot prompts {spec!r}: neither a built-in set ({', '.join(BUILTIN)}) "
                                "nor a JSON file")
    content = json.loads(path.read_text())
    if not isinstance(content, dict) or not content.get("classnames") or not content.get("templates"):
        raise ValueError(f"{path} must hold non-empty 'classnames' and 'templates' lists")
    return list(content["classnames"]), list(content["templates"])


def load_heldout(spec: str) -> frozenset[int]:
    """Labels of the classes a JSON prompt file lists under `"heldout"`: classes kept out of
    training (a compositional zero-shot test), whose metrics are worth reporting apart. Empty for a
    built-in set or a file without the key.

    Raises:
        ValueError: a held-out name that is not among the file's `classnames`.
    """
    classnames = load_prompts(spec)[0]
    if spec in BUILTIN:
        return frozenset()
    heldout = json.loads(Path(spec).read_text()).get("heldout", [])
    unknown = [name for name in heldout if name not in classnames]
    if unknown:
        raise ValueError(f"{spec}: 'heldout' names {unknown[:3]} that are not in 'classnames'")
    return frozenset(classnames.index(name) for name in heldout)
