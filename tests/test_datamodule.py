"""The data workers of vlp's loaders: Ctrl-C is the main process's, seeding is Lightning's."""
import random
import signal
from functools import partial

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, IterableDataset

from vlp.datamodule import leave_ctrl_c_to_the_main_process


class WorkerState(IterableDataset):
    """Yields, from inside a worker, whether it ignores SIGINT and a draw of each RNG."""

    def __iter__(self):
        yield (signal.getsignal(signal.SIGINT) is signal.SIG_IGN, torch.rand(()).item(),
               float(np.random.rand()), random.random())


def first_item(worker_init_fn):
    torch.manual_seed(5)  # the loader draws its workers' base seed from the main process's RNG
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # a worker inherits it: not ignored
    try:
        return next(iter(DataLoader(WorkerState(), batch_size=None, num_workers=1, worker_init_fn=worker_init_fn)))
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_worker_ignores_sigint_and_draws_what_lightnings_seeding_gives():
    pl.seed_everything(3, workers=True)
    ignores, *draws = first_item(partial(leave_ctrl_c_to_the_main_process, rank=1))
    lightning_ignores, *lightning_draws = first_item(partial(pl_worker_init_function, rank=1))
    assert ignores and not lightning_ignores
    assert draws == lightning_draws
    assert draws != first_item(partial(pl_worker_init_function, rank=0))[1:]  # the rank counts
