"""What `vlp-train` reports in one line (bad input, found before training) and what it lets raise."""
import os
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Sequence

import pytorch_lightning as pl
from omegaconf.errors import MissingMandatoryValue


class BadInput(Exception):
    """Bad input found before training: reported in one line, without a traceback."""


def reject_repeated_overrides(args: Sequence[str]) -> None:
    """Raises BadInput when a key is given twice, as the shell's expansion of an unquoted brace pattern does.

    Hydra would keep the last value (`data.train.urls=/d/train-{000..099}.tar` unquoted becomes 100
    overrides and trains on one shard), so a repeated key is never what the user meant.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return  # Lightning's spawned ranks get hydra.run.dir etc. appended to the user's arguments
    values = defaultdict(list)
    for arg in args:
        if not arg.startswith("-") and "=" in arg:
            key, value = arg.split("=", 1)
            values[key.lstrip("+~")].append(value)
    repeated = {key: v for key, v in values.items() if len(v) > 1}
    if repeated:
        key, given = next(iter(repeated.items()))
        shown = ", ".join(given[:3]) + (", ..." if len(given) > 3 else "")
        raise BadInput(f"{key} is given {len(given)} times ({shown}) and only the last would count; if the shell "
                       "expanded an unquoted brace pattern or glob, quote it so it reaches vlp whole: "
                       f"'{key}=\"/d/train-{{000..099}}.tar\"'")


class TrainingStarted(pl.Callback):
    """Tells bad input (raised while Lightning sets up data and model) from failures during training."""

    def __init__(self):
        self.started = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = True

    @contextmanager
    def input_errors_as_bad_input(self) -> Iterator[None]:
        """Re-raises a missing file, unset key or bad value as BadInput until training starts; later, as is."""
        try:
            yield
        except (FileNotFoundError, MissingMandatoryValue, ValueError) as err:
            if self.started:
                raise
            raise BadInput(f"{type(err).__name__}: {err}") from err
