"""vlp: vision-language pretraining on PyTorch Lightning, Hydra, webdataset and open_clip."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vlp")
except PackageNotFoundError:  # used from a source tree without installing
    __version__ = "0+unknown"
