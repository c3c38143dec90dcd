"""benchmarks/gpu_check.py --smoke: the GPU check's driver runs end to end on the CPU, so it cannot
rot between the rare runs on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("train", "inference", "predict", "patchcore", "ddp")


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_section_and_the_targets(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["smoke"] and report["torch"] and report["timm"]
    # each section measured, failed with its error, or was skipped with a reason; none is missing
    assert set(SECTIONS) <= set(report["sections"])
    for name in SECTIONS:
        section = report["sections"][name]
        assert section, name
    assert report["sections"]["inference"]["1"]["images_per_s"] > 0
    assert report["sections"]["train"]["synthetic_eager"]["images_per_s"] > 0
    assert set(report["targets"]) == {"train_images_per_s_bf16", "inference_images_per_s_batch_256",
                                      "predict_images_per_s"}
    assert report["targets"]["inference_images_per_s_batch_256"]["target"] == 10000
