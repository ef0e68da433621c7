"""scripts/gpu_check.py never rots: its CPU dry run takes the same code paths (minus the
CUDA-only ones) and writes the JSON the GPU run writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gc"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--device", "cpu",
                        "--tiny", "--out", str(out)], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    configs = [x["config"] for x in result["throughput"]]
    assert configs == ["synthetic, eager", "pass shards, --decode cpu, eager",
                       "384 shards, --decode cpu, eager"]
    for x in result["throughput"]:
        assert x["img_s"] > 0 and 0 <= x["data_wait"] <= 1 and x["steps"] > 0
        assert x["ratio_to_synthetic"] > 0
    assert result["nvjpeg"]["img_s"] > 0 and result["nvjpeg"]["images"] > 0
    c = result["correctness"]
    assert c["counted_once"] and c["val_samples"] == c["val_samples_expected"] == 40
    assert c["resume_ok"], (c["losses_uninterrupted"], c["losses_killed_resumed"])
    assert c["nccl"]["ok"] and c["nccl"]["backend"] == "gloo"
    assert c["top1_ok"]
    assert "| configuration | img/s | real/synthetic | data wait | peak GiB |" in r.stdout
    assert result["env"]["c_helpers_built"] == {"prep.jpeg": True, "train.jpeg_region": True,
                                                "shards.tarpack": True}


@pytest.mark.parametrize("args,message", [
    (["--device", "tpu"], "--device 'tpu': expected cpu, cuda or cuda:N"),
    (["--device", "cuda:7"], "--device cuda:7: no such CUDA device here"),
    (["--out", "FILE"], "is a file; give a directory for the results"),
])
@pytest.mark.slow
def test_bad_arguments_are_one_line(tmp_path, args, message):
    (tmp_path / "notes").write_text("mine")
    args = [str(tmp_path / "notes") if a == "FILE" else a for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "gc")]
    r = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), *args, *out],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and message in r.stderr
    assert (tmp_path / "notes").read_text() == "mine"
