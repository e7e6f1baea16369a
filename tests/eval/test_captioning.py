"""Caption metrics: attribute accuracy by hand, BLEU-4 and CIDEr against known values."""
import pytest

from vlp.data.synthetic import CLASSNAMES
from vlp.eval.captioning import attribute_accuracy, caption_metrics


@pytest.mark.parametrize("caption, right", [
    ("a photo of a red circle .", True),
    ("a large red circle on the left", True),
    ("a red square .", False),  # wrong shape
    ("a blue circle .", False),  # wrong colour
    ("a red circle and a blue star .", False),  # names more than the object
    ("red blue green circle square star", False),  # listing everything does not pass
    ("a photo of a shape .", False),
    ("a redcircle", False),
])
def test_attribute_accuracy_needs_exactly_the_right_colour_and_shape(caption, right):
    assert attribute_accuracy([caption], [CLASSNAMES.index("red circle")], CLASSNAMES) == float(right)


def test_attribute_accuracy_is_the_share_of_right_captions():
    labels = [CLASSNAMES.index(n) for n in ("red circle", "blue star", "pink square", "green star")]
    captions = ["a red circle .", "a blue star .", "a pink circle .", "one green star on the left ."]
    assert attribute_accuracy(captions, labels, CLASSNAMES) == 0.75


def test_bleu_and_cider_reward_matching_captions():
    references = [["a red circle on the left ."], ["two shapes : a blue star and a pink square ."],
                  ["a picture of a single yellow triangle ."]]
    perfect = caption_metrics([r[0] for r in references], references)
    assert perfect["caption_bleu4"] == pytest.approx(1.0)
    # CIDEr-D of a perfect caption is 10 x the Gaussian length penalty of 0 (= 1) under the clipped tf-idf
    assert perfect["caption_cider"] > 1.0
    shuffled = caption_metrics([references[1][0], references[2][0], references[0][0]], references)
    assert shuffled["caption_bleu4"] < 0.2 and shuffled["caption_cider"] < 0.5 * perfect["caption_cider"]
