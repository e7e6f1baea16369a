"""VQA shards for `task=vqa`: one example per question, with the answer vocabulary of the training shards."""
import json
import logging
from pathlib import Path
from typing import Optional

from vlp.data.vqa import QuestionDecoder, build_answer_vocabulary
from vlp.data.wds import expand_urls
from vlp.datamodule import VLPDataModule

log = logging.getLogger(__name__)


class VQADataModule(VLPDataModule):
    """VLPDataModule whose examples are (image, question, answer scores), one per question of a sample.

    The answer vocabulary (`answers`) is the `num_answers` most frequent answers of the training
    shards, read once by every rank (the same list everywhere), or the list in the json file `answers_file`.
    `data.train.num_samples` counts questions.

    Args:
        num_answers: top-k size of the answer vocabulary (the classifier's width).
        answers_file: json list of answers to use instead of counting the training shards
            (e.g. the `answers.json` a previous run wrote).
        qa_key: webdataset extension of the json that holds `qa`.
        *args, **kwargs: as for `VLPDataModule`.
    """

    def __init__(self, *args, num_answers: int = 1000, answers_file: Optional[str] = None,
                 qa_key: str = "json", **kwargs):
        super().__init__(*args, **kwargs)
        if num_answers < 1:
            raise ValueError(f"data.num_answers must be positive, got {num_answers}")
        self.num_answers, self.answers_file, self.qa_key = num_answers, answers_file, qa_key
        self.answers: Optional[list[str]] = None

    def setup(self, stage: str) -> None:
        if self.answers is None:
            self.answers = self._vocabulary()
        self.train_decoder = QuestionDecoder(self.train_decoder, self.answers, self.num_answers, self.qa_key)
        self.val_decoder = QuestionDecoder(self.val_decoder, self.answers, self.num_answers, self.qa_key)
        super().setup(stage)

    def _vocabulary(self) -> list[str]:
        if self.answers_file:
            if not Path(self.answers_file).is_file():
                raise FileNotFoundError(f"data.answers_file={self.answers_file} does not exist")
            answers = json.loads(Path(self.answers_file).read_text())[: self.num_answers]
        else:
            answers = build_answer_vocabulary(expand_urls(self.train_cfg["urls"]), self.num_answers, self.qa_key,
                                              progress=self.trainer is None or self.trainer.is_global_zero)
        log.info("answer vocabulary: %d answers (top: %s)", len(answers), ", ".join(answers[:5]))
        return answers
