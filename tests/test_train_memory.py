"""Memory held across training steps, sweep trials and imports, on Lightning's and Hydra's own call paths."""
import subprocess
import sys
import weakref
from pathlib import Path

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir

from vlp.train import main, train

CONF = Path(__file__).resolve().parents[1] / "conf"


class GradientsAtBatchStart(pl.Callback):
    seen: list[int] = []  # Hydra builds the callback; the test reads what it saw

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        GradientsAtBatchStart.seen.append(sum(p.grad is not None for p in pl_module.parameters()))


def test_the_last_steps_gradients_are_freed_before_the_next_forward(tmp_path):
    # they would otherwise sit through the forward's activation peak: one more copy of the weights
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.data_dir={tmp_path}", "debug=fast", "model=clip_micro", "data.val.urls=null", "logger=csv",
            "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'run'}",
            f"+callbacks.grads._target_={__name__}.GradientsAtBatchStart"])
    cfg.paths.run_dir = str(tmp_path / "run")
    GradientsAtBatchStart.seen.clear()
    train(cfg)
    assert GradientsAtBatchStart.seen == [0, 0, 0]


def test_training_entry_points_import_lightning_without_scipy_signal():
    # torchmetrics imports scipy.signal for a shim of its own tests: ~80 MB in every process
    code = ("import sys, vlp.train, vlp.evaluate; "
            "assert 'torchmetrics' in sys.modules and 'scipy.signal' not in sys.modules, 'scipy.signal imported'; "
            "import scipy.signal; assert hasattr(scipy.signal, 'windows'), 'stand-in left behind'; "
            "from torchmetrics.functional.text import bleu_score; "
            "assert bleu_score(['a red circle left of a blue square'], [['a red circle left of a blue square']]) == 1")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


class PreviousTrialsModules(pl.Callback):
    modules: list[weakref.ref] = []
    alive_at_start: list[int] = []  # per trial, how many earlier trials' modules were still alive

    def on_train_start(self, trainer, pl_module):
        PreviousTrialsModules.alive_at_start.append(sum(ref() is not None for ref in PreviousTrialsModules.modules))
        PreviousTrialsModules.modules.append(weakref.ref(pl_module))


def test_a_sweeps_next_trial_starts_without_the_previous_trials_model(tmp_path, monkeypatch):
    # the trainer, model and optimiser form reference cycles that only a full collection frees
    PreviousTrialsModules.modules.clear()
    PreviousTrialsModules.alive_at_start.clear()
    monkeypatch.setattr(sys, "argv", [
        "vlp-train", "-m", "optim.lr=1e-4,3e-4", f"paths.data_dir={tmp_path}", "debug=fast", "model=clip_micro",
        "data.val.urls=null", "logger=csv", "trainer.max_steps=2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"+callbacks.trials._target_={__name__}.PreviousTrialsModules"])
    main()
    assert PreviousTrialsModules.alive_at_start == [0, 0]
