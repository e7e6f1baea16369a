"""vlp: vision-language pretraining on PyTorch Lightning, Hydra, webdataset and open_clip."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vlp")
except PackageNotFoundError:  # used from a source tree without installing
    __version__ = "0+unknown"


def __getattr__(name: str):
    # `vlp.load` imports torch and open_clip on first use, so `import vlp` stays light
    if name == "load":
        from vlp.api import load
        return load
    raise AttributeError(f"module 'vlp' has no attribute {name!r}")
