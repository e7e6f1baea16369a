"""Checkpoints are written without holding the serialised bytes in memory, atomically."""
import tracemalloc

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from vlp.resume import AtomicCheckpointIO

MB = 2**20


def peak_python_allocation(io, checkpoint, path) -> int:
    """Peak bytes Python allocated while saving (tensor storage itself is not Python memory)."""
    tracemalloc.start()
    try:
        io.save_checkpoint(checkpoint, path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_local_checkpoints_are_streamed_to_disk(tmp_path):
    checkpoint = {"state_dict": {"w": torch.randn(8 * MB // 4)}, "global_step": 7}  # 8 MB of weights
    path = tmp_path / "checkpoints" / "last.ckpt"
    assert peak_python_allocation(AtomicCheckpointIO(), checkpoint, path) < 2 * MB
    assert peak_python_allocation(TorchCheckpointIO(), checkpoint, tmp_path / "lightning.ckpt") > 8 * MB  # in memory
    loaded = torch.load(path, weights_only=False)
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["w"], checkpoint["state_dict"]["w"])
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_overwriting_replaces_the_file_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)
    io.save_checkpoint({"global_step": 2}, path)
    assert torch.load(path, weights_only=False)["global_step"] == 2
