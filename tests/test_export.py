"""A trained model leaves vlp: vlp-export to open_clip, vlp.load, init_from, towers.pretrained, safe loading."""
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import SMALL_DATA, run_module
from PIL import Image

import vlp
from vlp.checkpoint import load_weights
from vlp.models import VLPModel, open_clip_towers

CAPTIONS = ["a red circle", "two blue squares on a grey background"]

# runs in a process that never imports vlp: what open_clip users and clip_benchmark do
OPEN_CLIP_ONLY = """
import sys, torch, open_clip
from PIL import Image
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + sys.argv[1])
model.eval()
tokenizer = open_clip.get_tokenizer("local-dir:" + sys.argv[1])
image = Image.open(sys.argv[2])
with torch.no_grad():
    out = {"image": model.encode_image(preprocess(image)[None], normalize=True),
           "text": model.encode_text(tokenizer(sys.argv[4:]), normalize=True), "scale": model.logit_scale.exp()}
assert not [m for m in sys.modules if m == "vlp" or m.startswith("vlp.")], "open_clip alone must load it"
torch.save(out, sys.argv[3])
"""


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "demo"
    run_module("vlp.export", trained_run[0] / "checkpoints" / "last.ckpt", out)
    return out


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "shape.png"
    image = Image.new("RGB", (90, 70), (40, 40, 40))
    image.paste((220, 30, 30), (20, 15, 60, 50))
    image.save(path)
    return path


def embeddings(model, preprocess, tokenizer, image_file):
    with torch.no_grad():
        return model.encode_image(preprocess(Image.open(image_file))[None]), model.encode_text(tokenizer(CAPTIONS))


def test_export_loads_in_open_clip_without_vlp_with_equal_embeddings(trained_run, exported, image_file, tmp_path):
    config = json.loads((exported / "open_clip_config.json").read_text())
    assert {"model_cfg", "preprocess_cfg"} <= set(config)
    assert (exported / "open_clip_model.safetensors").is_file()
    result = tmp_path / "open_clip.pt"
    subprocess.run([sys.executable, "-c", OPEN_CLIP_ONLY, exported, image_file, result, *CAPTIONS], check=True,
                   capture_output=True, timeout=300)
    theirs = torch.load(result, weights_only=True)
    model, preprocess, tokenizer = vlp.load(trained_run[0] / "checkpoints" / "last.ckpt")
    image, text = embeddings(model, preprocess, tokenizer, image_file)
    assert (image - theirs["image"]).abs().max() <= 1e-5
    assert (text - theirs["text"]).abs().max() <= 1e-5
    assert torch.allclose(model.scale(), theirs["scale"])


def test_vlp_load_gives_a_transform_a_tokenizer_and_no_random_init_warning(trained_run, exported, image_file,
                                                                           caplog):
    ckpt = trained_run[0] / "checkpoints" / "last.ckpt"
    with caplog.at_level("WARNING"):
        model, preprocess, tokenizer = vlp.load(ckpt)
    assert "No pretrained weights" not in caplog.text
    assert not model.training
    assert preprocess(Image.open(image_file)).shape == (3, 64, 64)
    from_export = vlp.load(exported)
    for ours, theirs in zip(embeddings(model, preprocess, tokenizer, image_file),
                            embeddings(*from_export, image_file)):
        assert torch.equal(ours, theirs)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_loading_never_runs_code_from_the_file(trained_run, tmp_path):
    pickled = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode()}, pickled)
    with pytest.raises(ValueError, match="evil.ckpt .*never runs code"):
        vlp.load(pickled)
    checkpoint = torch.load(trained_run[0] / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["vlp_config"]["model"]["towers"]["_target_"] = "os.system"
    crafted = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, crafted)
    with pytest.raises(ValueError, match="os.system"):
        vlp.load(crafted)


def test_a_damaged_checkpoint_is_named_in_one_line(trained_run, tmp_path):
    """A file cut short (a crash while saving) fails naming it, in the library, the CLI and the scripts."""
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes((trained_run[0] / "checkpoints" / "last.ckpt").read_bytes()[:4096])
    with pytest.raises(ValueError, match="damaged.ckpt is not a checkpoint vlp can read"):
        vlp.load(damaged)
    script = Path(__file__).parents[1] / "scripts" / "hard_negative_kinds.py"
    for command in ([sys.executable, "-m", "vlp.export", damaged, tmp_path / "out"],
                    [sys.executable, script, damaged]):
        proc = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and "damaged.ckpt is not a checkpoint vlp can read" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_load_weights_reports_keys_that_do_not_match_and_keeps_new_ones_fresh(trained_run, exported):
    ckpt = trained_run[0] / "checkpoints" / "last.ckpt"
    source = vlp.load(ckpt)[0]
    # a sigmoid-loss model has a logit bias the CLIP checkpoint lacks; a different text width does not fit
    target = VLPModel(open_clip_towers("vlp-clip-rn-micro"), init_logit_bias=-10.0)
    report = load_weights(target, ckpt)
    assert report.missing == ["logit_bias"] and not report.mismatched and not report.unexpected
    assert target.logit_bias.item() == -10.0
    assert torch.equal(target.logit_scale, source.logit_scale)
    line = str(report)
    assert "\n" not in line and "logit_bias" in line and str(ckpt) in line
    other = VLPModel(open_clip_towers("vlp-clip-micro"))
    report = load_weights(other, exported)
    assert report.mismatched and report.missing and report.unexpected
    assert "shape mismatch" in str(report)


def test_towers_pretrained_accepts_a_checkpoint_and_an_export(trained_run, exported):
    source = vlp.load(trained_run[0] / "checkpoints" / "last.ckpt")[0]
    for path in (trained_run[0] / "checkpoints" / "last.ckpt", exported):
        towers = open_clip_towers("vlp-clip-rn-micro", pretrained=str(path))
        assert all(torch.equal(a, b) for a, b in zip(towers.image.state_dict().values(),
                                                     source.image_tower.state_dict().values()))
        assert all(torch.equal(a, b) for a, b in zip(towers.text.state_dict().values(),
                                                     source.text_tower.state_dict().values()))
    with pytest.raises(ValueError, match="does not fit"):
        open_clip_towers("vlp-clip-micro", pretrained=str(exported))


def test_init_from_with_locked_image_tower_starts_a_new_run_at_step_zero(trained_run, tmp_path):
    run_dir, data_dir = trained_run
    proc = run_module("vlp.train", "debug=fast", f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}",
                      *SMALL_DATA, "trainer.max_steps=2", "model.lock_image=true",
                      "model.lock_image_freeze_bn_stats=true", f"init_from={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert "init_from: loaded" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["global_step"] == 2  # not 4 + 2
    source = vlp.load(run_dir / "checkpoints" / "last.ckpt")[0]
    result = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert result["global_step"] == 2
    state = result["state_dict"]
    frozen = {k: v for k, v in source.image_tower.state_dict().items() if not k.endswith("num_batches_tracked")}
    for key, value in frozen.items():  # weights and BatchNorm statistics
        assert torch.equal(state[f"model.image_tower.{key}"], value), key
    # the text tower trained on from the source's weights
    assert not all(torch.equal(state[f"model.text_tower.{k}"], v) for k, v in source.text_tower.state_dict().items())
    # a LiT model (frozen BatchNorm) exports to a folder open_clip loads strictly
    run_module("vlp.export", tmp_path / "checkpoints" / "last.ckpt", tmp_path / "export")
    assert open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
