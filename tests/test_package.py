"""vlp as an installed package: `pip install .` (not editable) ships conf/ and every console script works."""
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from conftest import SMALL_DATA

REPO = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_under_vlp_is_listed_for_installation():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "vlp").rglob("__init__.py")}
    assert found | {"vlp.conf"} == listed
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["vlp.conf"] == "conf"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with vlp installed from a wheel (its dependencies come from this environment): its bin/."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"  # a copy, so building leaves the working tree clean
    shutil.copytree(REPO / "vlp", source / "vlp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", source / "conf")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "wheel", source], check=True,
                   capture_output=True, timeout=300)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    [wheel] = (root / "wheel").glob("vlp-*.whl")
    subprocess.run([*pip, "--python", venv / "bin" / "python", "install", "--no-deps", wheel], check=True,
                   capture_output=True, timeout=300)
    # torch, open_clip, ... from this environment; its editable vlp is not visible (no .pth runs from there)
    purelib = Path(subprocess.check_output([venv / "bin" / "python", "-c",
                                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                           text=True).strip())
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def run_installed(bin_dir: Path, *args, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # ~1.5 min on 2 cores
def test_non_editable_install_trains_from_another_directory(installed, tmp_path):
    where = run_installed(installed, installed / "python", "-c", "import vlp.config; print(vlp.config.CONF_DIR)",
                          cwd=tmp_path).stdout.strip()
    assert where.startswith(str(installed.parent)) and Path(where, "train.yaml").is_file()
    run_installed(installed, installed / "vlp-train", "debug=fast", f"paths.data_dir={tmp_path / 'data'}",
                  "hydra.run.dir=run", *SMALL_DATA, cwd=tmp_path)
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    run_installed(installed, installed / "vlp-export", tmp_path / "run" / "checkpoints" / "last.ckpt", "export",
                  cwd=tmp_path)
    assert (tmp_path / "export" / "open_clip_config.json").is_file()


@pytest.mark.parametrize("script", ["vlp-train", "vlp-eval", "vlp-export", "vlp-synthetic"])
def test_every_console_script_answers_help(installed, tmp_path, script):
    assert script in PYPROJECT["project"]["scripts"]
    assert run_installed(installed, installed / script, "--help", cwd=tmp_path).stdout
