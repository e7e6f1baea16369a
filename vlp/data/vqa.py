"""VQA data: questions with human answers from `{key}.json`, a closed answer vocabulary, soft targets.

A sample's json carries `"qa": [{"question": str, "answers": [str, ...], "answer_type": str}, ...]`:
one answer (synthetic data, GQA) or many (VQA v2 keeps ten human answers); `answer_type` is optional.
Answers are compared after `normalize_answer` (lower case, trimmed, no final full stop).
"""
import json
from collections import Counter
from typing import Iterable, Optional

import torch
import webdataset as wds
from tqdm import tqdm

from vlp.data.wds import SampleDecoder


def normalize_answer(answer: str) -> str:
    return " ".join(answer.lower().split()).rstrip(".")


def answer_scores(answers: list[str], index: dict[str, int], num_answers: int) -> torch.Tensor:
    """(num_answers,) VQA accuracy of answering each vocabulary entry.

    An answer given by n of the H humans scores min(n / min(3, H), 1): VQA's min(n / 3, 1) for
    three or more humans, and 1 for the answer of a single-answer question.
    """
    scores = torch.zeros(num_answers)
    if not answers:
        return scores
    agreement = min(3, len(answers))
    for answer, count in Counter(map(normalize_answer, answers)).items():
        if answer in index:
            scores[index[answer]] = min(count / agreement, 1.0)
    return scores


def read_qa(sample: dict, qa_key: str = "json") -> list[dict]:
    """The question list of a raw webdataset sample.

    Raises:
        KeyError: the sample has no `qa` list.
    """
    meta = json.loads(sample[qa_key]) if qa_key in sample else {}
    if not isinstance(meta.get("qa"), list):
        raise KeyError(f"no 'qa' list in {qa_key} of sample {sample.get('__key__')}")
    return meta["qa"]


def build_answer_vocabulary(urls: Iterable[str], top_k: int, qa_key: str = "json",
                            progress: bool = True) -> list[str]:
    """The top_k most frequent (normalised) human answers in the shards, most frequent first.

    Ties break alphabetically, so every rank builds the same list from the same shards.
    """
    counts: Counter = Counter()
    urls = list(urls)
    samples = wds.tarfile_to_samples()(dict(url=u) for u in urls)
    for sample in tqdm(samples, desc="answer vocabulary", unit="img", disable=not progress):
        if qa_key in sample:
            for qa in json.loads(sample[qa_key]).get("qa", []):
                counts.update(normalize_answer(a) for a in qa["answers"])
    if not counts:
        raise ValueError(f"no answers ('qa' in {qa_key}) in the shards {urls[0]} ...: not VQA data")
    return [a for a, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top_k]]


class QuestionDecoder:
    """Raw webdataset sample -> one (image, question, target) example per question.

    The label is {"scores": (num_answers,) VQA accuracy of each answer, "answer_type": str,
    "labelled": whether the sample has a class (`.cls`; on the synthetic data: a held-out pair)}.

    Args:
        images: decodes and transforms the sample's image (its `image` method).
        answers: the answer vocabulary.
        num_answers: length of the score vector (>= len(answers); the classifier's width).
        qa_key: webdataset extension of the json holding `qa`.
    """

    def __init__(self, images: SampleDecoder, answers: list[str], num_answers: Optional[int] = None,
                 qa_key: str = "json"):
        self.images, self.qa_key = images, qa_key
        self.index = {a: i for i, a in enumerate(answers)}
        self.num_answers = num_answers or len(answers)

    def __call__(self, sample: dict) -> list[tuple[torch.Tensor, str, dict, list, Optional[torch.Tensor]]]:
        qa = read_qa(sample, self.qa_key)
        image, boxes = self.images.image(sample)
        # (image, text, label, hard negative captions, boxes) like SampleDecoder's; questions have no negatives
        labelled = self.images.label_key in sample  # synthetic validation: the held-out pairs
        return [(image, q["question"], {"scores": answer_scores(q["answers"], self.index, self.num_answers),
                                        "answer_type": q.get("answer_type", ""), "labelled": labelled}, [], boxes)
                for q in qa]
