"""The benchmark scripts run their variants through vlp-train and print their tables."""
import re
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parents[1] / "scripts"


def run_script(name: str, *args) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_fusion_bench_prints_speed_and_memory_of_every_variant():
    out = run_script("fusion_bench.py", "--regions", "--rounds", 1, "--steps", 4, "--skip", 1, "--batch-size", 8,
                     "--width", 32)
    rows = re.findall(r"^\| ([a-z_ ()]+) \| ([\d.]+) \| ([\d.]+)x \| (\d+) \|$", out, re.MULTILINE)
    assert [row[0] for row in rows] == ["none (dual encoder)", "cross_attention", "merged", "co_attention",
                                        "cross_attention regions"]
    assert all(float(speed) > 0 and int(rss) > 100 for _, speed, _, rss in rows)
    assert rows[0][2] == "1.00"


def test_microbatch_bench_prints_both_configurations(tmp_path):
    out = run_script("microbatch_bench.py", "--model", "vlp-clip-micro", "--batch-size", 32, "--micro-batch-size", 8,
                     "--steps", 3, "--skip", 1, "--rounds", 1, "--data-dir", tmp_path)
    rows = re.findall(r"^\| (null|8) \| ([\d.]+) \| (\d+) MB \|$", out, re.MULTILINE)
    assert [row[0] for row in rows] == ["null", "8"] and all(float(speed) > 0 for _, speed, _ in rows)
