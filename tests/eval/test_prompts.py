import json

import pytest

from vlp.data.synthetic import CLASSNAMES, HELDOUT, write_dataset
from vlp.eval.prompts import load_heldout


def test_heldout_labels_of_the_synthetic_prompt_file_are_its_heldout_pairs(tmp_path):
    write_dataset(tmp_path, train_samples=1, val_samples=1, val_seen_samples=1, image_size=16, workers=1)
    labels = load_heldout(str(tmp_path / "zeroshot.json"))
    assert sorted(CLASSNAMES[i] for i in labels) == sorted(f"{c} {s}" for c, s in HELDOUT)


def test_heldout_is_empty_for_builtin_sets_and_files_without_the_key(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"classnames": ["cat", "dog"], "templates": ["a {}."]}))
    assert load_heldout(str(path)) == frozenset() and load_heldout("imagenet") == frozenset()


def test_a_heldout_name_missing_from_the_classnames_is_named(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"classnames": ["cat", "dog"], "templates": ["a {}."], "heldout": ["dgo"]}))
    with pytest.raises(ValueError, match=r"prompts.json: 'heldout' names \['dgo'\]"):
        load_heldout(str(path))
