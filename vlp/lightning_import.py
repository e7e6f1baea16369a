"""Imports Lightning without the scipy.signal that comes with it: ~80 MB less memory per process.

Lightning imports torchmetrics, whose `__init__` imports scipy.signal only to check for
`scipy.signal.hamming`, a shim for SRMRpy that only torchmetrics' own tests use
(Lightning-AI/torchmetrics#3457, fix proposed in #3459). scipy.signal pulls in most of scipy:
79 MB more resident memory in a training process (BENCHMARKS.md). While Lightning is imported,
`import scipy.signal` finds a stand-in that already has `hamming`; afterwards the stand-in is
gone, so any later `import scipy.signal` (torchmetrics' scipy-backed metrics import it when
called) loads the real module. Drop this module once torchmetrics no longer imports scipy.signal.

Entry points import it before anything else imports Lightning.
"""
import importlib.util
import sys
import types
from contextlib import contextmanager


@contextmanager
def _scipy_signal_stand_in():
    if {"scipy.signal", "torchmetrics"} & sys.modules.keys() or importlib.util.find_spec("scipy") is None:
        yield
        return
    stand_in = types.ModuleType("scipy.signal")
    stand_in.hamming = None  # torchmetrics only checks that it exists
    sys.modules["scipy.signal"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("scipy.signal") is stand_in:
            del sys.modules["scipy.signal"]


with _scipy_signal_stand_in():
    import pytorch_lightning  # noqa: F401
