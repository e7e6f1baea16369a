"""Synthetic questions, the answer vocabulary and question batches from real shards."""
import json

import open_clip
import pytest
import torch
import webdataset as wds

from vlp.data.synthetic import HELDOUT, render_sample, write_dataset
from vlp.data.synthetic_captions import relation_of
from vlp.data.synthetic_vqa import questions
from vlp.data.vqa import QuestionDecoder, build_answer_vocabulary
from vlp.data.wds import EvalStream, SampleDecoder, expand_urls


def _object(colour, shape, x, y):
    return {"colour": colour, "shape": shape, "x": x, "y": y}


def _answers(qa):
    return {q["question"]: q["answers"] for q in qa}


def test_two_objects_get_colour_shape_count_and_spatial_questions():
    qa = _answers(questions([_object("blue", "square", 0.8, 0.5), _object("red", "circle", 0.2, 0.5)], relation_of))
    assert qa == {"what colour is the square?": ["blue"], "what shape is the blue object?": ["square"],
                  "what colour is the circle?": ["red"], "what shape is the red object?": ["circle"],
                  "how many shapes are there?": ["two"], "which shape is on the left?": ["circle"]}


def test_ambiguous_questions_are_not_asked():
    """Two circles: no "what colour is the circle?"; the spatial question asks for the colour."""
    qa = _answers(questions([_object("red", "circle", 0.5, 0.8), _object("blue", "circle", 0.5, 0.2)], relation_of))
    assert "what colour is the circle?" not in qa
    assert qa["what colour is the shape on top?"] == ["blue"]
    diagonal = _answers(questions([_object("red", "circle", 0.2, 0.2), _object("blue", "star", 0.7, 0.7)], relation_of))
    assert not any("left" in q or "top" in q for q in diagonal)


def test_validation_questions_are_about_held_out_pairs():
    for index in range(16):
        _, _, meta = render_sample(0, "val", index)
        if len(meta["objects"]) != 1:
            continue
        obj = meta["objects"][0]
        assert (obj["colour"], obj["shape"]) in HELDOUT
        qa = _answers(meta["qa"])
        assert qa[f"what colour is the {obj['shape']}?"] == [obj["colour"]]
        assert qa[f"what shape is the {obj['colour']} object?"] == [obj["shape"]]
        assert qa["how many shapes are there?"] == ["one"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("vqa"), train_samples=300, val_samples=40, samples_per_shard=100)


def _all_qa(pattern):
    samples = wds.tarfile_to_samples()(dict(url=u) for u in expand_urls(pattern))
    return [q for s in samples for q in json.loads(s["json"])["qa"]]


def test_answer_vocabulary_is_the_top_k_answers_by_count(shards):
    qa = _all_qa(shards["train"])
    counts = {}
    for q in qa:
        counts[q["answers"][0]] = counts.get(q["answers"][0], 0) + 1
    vocabulary = build_answer_vocabulary(expand_urls(shards["train"]), top_k=5, progress=False)
    assert vocabulary == sorted(counts, key=lambda a: (-counts[a], a))[:5]
    assert len(build_answer_vocabulary(expand_urls(shards["train"]), top_k=100, progress=False)) == len(counts)


def test_question_batches_hold_every_question_once_with_its_scores(shards):
    answers = build_answer_vocabulary(expand_urls(shards["train"]), top_k=16, progress=False)
    decoder = QuestionDecoder(SampleDecoder(lambda image: torch.zeros(3, 8, 8)), answers, num_answers=16)
    stream = EvalStream(expand_urls(shards["val"]), decoder, open_clip.get_tokenizer("vlp-clip-micro"), batch_size=7)
    batches = list(stream)
    expected = _all_qa(shards["val"])
    scores = torch.cat([b.labels["scores"] for b in batches])
    assert scores.shape == (len(expected), 16)
    types = [t for b in batches for t in b.labels["answer_type"]]
    assert types == [q["answer_type"] for q in expected]
    labelled = torch.cat([b.labels["labelled"] for b in batches])
    assert labelled.any() and not labelled.all()  # the single-object (held-out) validation images have a class
    for row, q in zip(scores, expected):  # one answer per synthetic question: 1 at it, 0 elsewhere
        assert row.sum() == (q["answers"][0] in answers)
        if q["answers"][0] in answers:
            assert row[answers.index(q["answers"][0])] == 1.0


def test_a_sample_without_questions_is_skipped_and_counted(shards):
    decoder = QuestionDecoder(SampleDecoder(lambda image: torch.zeros(3, 8, 8)), ["red"])
    with pytest.raises(KeyError, match="no 'qa' list"):
        decoder({"__key__": "x", "png": b"", "json": b'{"objects": []}'})
