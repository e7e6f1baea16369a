"""Experiment loggers from config; wandb goes offline when no account is configured."""
import logging
import netrc
import os
from typing import Mapping, Optional

from hydra.utils import instantiate
from pytorch_lightning.loggers import Logger

from vlp.resumable_loggers import continuation_kwargs

log = logging.getLogger(__name__)


def wandb_account_configured() -> bool:
    """True when wandb can sync: an API key in the environment or in ~/.netrc (wandb login)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def build_loggers(cfg: Optional[Mapping], run_dir: str, resume_step: int = 0) -> list[Logger]:
    """Instantiates each configured logger; logs already in `run_dir` are kept up to `resume_step`
    (the global step of the checkpoint a run resumes from; 0 for a fresh start)."""
    loggers = []
    for name, logger_cfg in (cfg or {}).items():
        if logger_cfg is None:
            continue
        logger_cfg = {**logger_cfg, **continuation_kwargs(logger_cfg["_target_"], run_dir, resume_step)}
        if "Wandb" in logger_cfg["_target_"] and not logger_cfg.get("offline") and not wandb_account_configured():
            if os.environ.get("WANDB_MODE") != "offline":
                log.warning("wandb: no account configured; logging offline to %s/wandb "
                            "(sync later with `wandb sync`)", run_dir)
            loggers.append(instantiate(logger_cfg, offline=True))
        else:
            loggers.append(instantiate(logger_cfg))
    return loggers
