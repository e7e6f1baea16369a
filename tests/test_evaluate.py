"""`vlp-eval` as users run it: its numbers equal training's validation on the same data."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import SMALL_DATA, run_module

from vlp.eval.prompts import load_prompts

# the debug=fast validation of the trained_run fixture: same batch size and batch limit
SAME_AS_TRAINING = (*SMALL_DATA, "trainer.limit_val_batches=2")


def vlp_eval(run_dir, *overrides) -> dict[str, float]:
    proc = run_module("vlp.evaluate", f"hydra.run.dir={run_dir}", *SAME_AS_TRAINING, *overrides)
    assert "vlp-eval of" in proc.stdout  # the table
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def val_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("val/")}


@pytest.fixture(scope="module")
def val_folder(trained_run, tmp_path_factory) -> Path:
    """The validation shards' labelled images as an ImageNet-style folder, one sub-folder per class index
    (32, some empty); the two-object images (no class) stay out, as zero-shot in training leaves them out."""
    root = tmp_path_factory.mktemp("folder")
    synthetic = trained_run[1] / "synthetic"
    for c in range(len(load_prompts(str(synthetic / "zeroshot.json"))[0])):
        (root / f"{c:02d}").mkdir()
    for shard in sorted(synthetic.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in members:
                key = name.removesuffix(".png")
                if name.endswith(".png") and key + ".cls" in members:
                    label = int(tar.extractfile(members[key + ".cls"]).read())
                    (root / f"{label:02d}" / name).write_bytes(tar.extractfile(members[name]).read())
    return root


def test_eval_of_checkpoint_and_export_equals_validation_in_training(trained_run, tmp_path):
    run_dir, data_dir = trained_run
    trained = val_metrics(json.loads((run_dir / "metrics.json").read_text()))
    assert trained["val/num_samples"] == 64 and "val/zeroshot_top1" in trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    from_ckpt = vlp_eval(tmp_path / "ckpt", f"model_path={ckpt}", f"paths.data_dir={data_dir}")
    assert val_metrics(from_ckpt) == pytest.approx(trained, abs=1e-6)
    export = tmp_path / "export"
    run_module("vlp.export", ckpt, export)
    from_export = vlp_eval(tmp_path / "export-eval", f"model_path={export}", f"paths.data_dir={data_dir}")
    assert val_metrics(from_export) == pytest.approx(trained, abs=1e-6)
    # the same folder as a plain open_clip model (the model group's towers), as any local-dir folder
    as_open_clip = vlp_eval(tmp_path / "open-clip-eval", f"model.towers.arch=local-dir:{export}",
                            f"paths.data_dir={data_dir}")
    assert val_metrics(as_open_clip) == pytest.approx(trained, abs=1e-6)


def test_image_folder_zero_shot_equals_the_shards_and_the_training_callback(trained_run, val_folder, tmp_path):
    run_dir, data_dir = trained_run
    prompts = data_dir / "synthetic" / "zeroshot.json"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    metrics = vlp_eval(tmp_path / "eval", f"model_path={ckpt}", f"paths.data_dir={data_dir}",
                       f"image_folder={val_folder}", "trainer.limit_val_batches=null")
    assert metrics["val/num_samples"] == 64 and metrics["folder/num_samples"] == 32  # the single-object half
    for k in ("zeroshot_top1", "zeroshot_top5"):
        assert metrics[f"folder/{k}"] == pytest.approx(metrics[f"val/{k}"], abs=1e-6)
    # vlp-train runs the same evaluation periodically; at the last step it sees last.ckpt's weights
    callback = (f"+callbacks.zeroshot={{_target_:vlp.callbacks.ZeroShotEvaluation,image_folder:'{val_folder}',"
                f"zeroshot:'{prompts}',every_n_steps:2,name:folder,num_workers:0}}")
    train_dir = tmp_path / "train"
    run_module("vlp.train", "debug=fast", f"paths.data_dir={data_dir}", f"hydra.run.dir={train_dir}", *SMALL_DATA,
               callback)
    trained = json.loads((train_dir / "metrics.json").read_text())
    again = vlp_eval(tmp_path / "eval2", f"model_path={train_dir / 'checkpoints' / 'last.ckpt'}",
                     f"paths.data_dir={data_dir}", f"image_folder={val_folder}", "data.val.urls=null")
    assert set(again) == {"folder/zeroshot_top1", "folder/zeroshot_top5", "folder/num_samples"}
    assert trained["folder/zeroshot_top1"] == pytest.approx(again["folder/zeroshot_top1"], abs=1e-6)


def test_builtin_imagenet_prompts_come_from_open_clip():
    classnames, templates = load_prompts("imagenet")
    assert len(classnames) == 1000 and classnames[0] == "tench" and len(templates) == 80
    assert templates[0]("tench") == "a bad photo of a tench."


@pytest.mark.parametrize("override,message", [
    ("data.val.urls=null", "nothing to evaluate"),
    ("zeroshot=imagenet", "has 32 class folders but the zero-shot prompts name 1000 classes"),
    ("model_path=/no/such.ckpt", "/no/such.ckpt"),
])
def test_bad_input_is_reported_in_one_line(trained_run, val_folder, tmp_path, override, message):
    run_dir, data_dir = trained_run
    args = [f"hydra.run.dir={tmp_path}", f"paths.data_dir={data_dir}", *SMALL_DATA,
            f"model_path={run_dir / 'checkpoints' / 'last.ckpt'}"]
    if override.startswith("zeroshot"):
        args.append(f"image_folder={val_folder}")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "vlp.evaluate", *args, override], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 1
    assert message in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr
