"""VQA accuracy against hand-computed cases."""
import pytest
import torch

from vlp.data.vqa import answer_scores, normalize_answer
from vlp.eval.vqa import vqa_accuracy, vqa_metrics

VOCAB = ["yes", "no", "2", "red"]
INDEX = {a: i for i, a in enumerate(VOCAB)}


@pytest.mark.parametrize("answers, expected", [
    (["yes"] * 10, [1, 0, 0, 0]),  # unanimous
    (["yes"] * 2 + ["no"] * 8, [2 / 3, 1, 0, 0]),  # 2 of 10 humans: 2/3; 8: capped at 1
    (["yes"] + ["no"] * 3 + ["blue"] * 6, [1 / 3, 1, 0, 0]),  # "blue" is outside the vocabulary
    (["red"], [0, 0, 0, 1]),  # a single-answer question: its answer is fully right
    (["2", "no"], [0, 0.5, 0.5, 0]),  # two humans, one each
    ([" Yes.", "YES", "yes"], [1, 0, 0, 0]),  # normalised before counting
    ([], [0, 0, 0, 0]),
])
def test_answer_scores_are_min_of_humans_over_three_and_one(answers, expected):
    torch.testing.assert_close(answer_scores(answers, INDEX, 4), torch.tensor(expected, dtype=torch.float32))


def test_accuracy_is_the_score_of_the_predicted_answer_and_splits_by_type():
    scores = torch.stack([answer_scores(a, INDEX, 4) for a in (["yes"] * 2 + ["no"] * 8, ["red"], ["2"] * 10)])
    logits = torch.tensor([[5.0, 0, 0, 0],  # "yes": 2/3
                           [0, 0, 0, 1.0],  # "red": 1
                           [0, 3.0, 0, 0]])  # "no" where humans said "2": 0
    accuracy = vqa_accuracy(logits, scores)
    torch.testing.assert_close(accuracy, torch.tensor([2 / 3, 1.0, 0.0]))
    metrics = vqa_metrics(accuracy.tolist(), ["yes/no", "other", "number"])
    assert metrics["vqa_acc"] == pytest.approx((2 / 3 + 1) / 3)
    assert metrics["vqa_acc_yes_no"] == pytest.approx(2 / 3)
    assert metrics["vqa_acc_other"] == 1.0 and metrics["vqa_acc_number"] == 0.0


def test_a_constant_answer_scores_its_share_not_more():
    """A collapsed model that always says "yes" scores what "yes" is worth, never 100%."""
    scores = torch.stack([answer_scores([a], INDEX, 4) for a in ["yes", "no", "no", "red"]])
    logits = torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1)
    assert vqa_accuracy(logits, scores).mean().item() == pytest.approx(0.25)


def test_normalize_answer():
    assert normalize_answer("  Two  Dogs. ") == "two dogs"
