"""Checkpoint writing that does not hold the serialised checkpoint in memory (Lightning glue)."""
import os
from pathlib import Path
from typing import Any, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO


class StreamingCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, but local files are streamed to disk.

    Lightning serialises a checkpoint into an in-memory buffer before writing it
    (`_atomic_save`), so each save briefly holds a second copy of the checkpoint (parameters
    and optimiser state: ~3x the parameters with AdamW) on top of the live training state,
    which sets the run's peak host memory. Local checkpoints are written by torch.save into a
    temporary file beside the target and renamed over it, which is as atomic; remote URLs
    keep Lightning's way.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        torch.save(checkpoint, partial)
        os.replace(partial, path)  # atomic: readers see the old file or the new one, never half of one
