"""The `compile` switch: torch.compile's options, and a check that this platform can compile."""
import logging
from typing import Optional, Union

import torch

log = logging.getLogger(__name__)


def compile_options(compile: Union[bool, dict, None]) -> Optional[dict]:
    """The keyword arguments for torch.compile that a `compile` switch asks for; None for off.

    Args:
        compile: False/None (off), True (torch.compile's defaults) or its keyword arguments
            (e.g. {"mode": "max-autotune"}).
    """
    if not compile:
        return None
    return {} if compile is True else dict(compile)


def can_compile(options: dict) -> bool:
    """Compiles a one-line function with `options`; warns and returns False where that fails.

    torch.compile compiles on the first call, so a missing C++ compiler or an unsupported
    Python would otherwise surface in the middle of the first training step.
    """
    try:
        torch.compile(lambda x: x * 2 + 1, **options)(torch.ones(2))
    except Exception as err:  # whatever the backend raises: the model stays usable eagerly
        log.warning("torch.compile does not work here, running eagerly: %s: %s",
                    type(err).__name__, str(err).strip().splitlines()[0] if str(err).strip() else "")
        return False
    return True

