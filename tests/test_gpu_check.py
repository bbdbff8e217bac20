"""bench/gpu_check.py on a machine without a GPU: the GPU-only steps are skipped and said so, and
nothing claims a GPU figure. (On a GPU these steps run for real; there gpu_check itself is the check.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, gpu_check runs these steps for real")


def test_a_gpu_only_step_is_skipped_and_reported_without_a_gpu(tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--only", "utilisation", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "utilisation: skipped, it measures a GPU" in result.stdout
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["env"]["gpu"] is None
    assert [(s["name"], s["exit"]) for s in report["steps"]] == [("utilisation", "skipped (no GPU)")]
    markdown = (tmp_path / "gpu_report.md").read_text()
    assert "no GPU figure was measured" in markdown and "| utilisation | skipped (no GPU) | 0 |" in markdown


def test_the_utilisation_bench_refuses_a_machine_without_a_gpu(tmp_path):
    result = subprocess.run([sys.executable, "bench/bench_throughput.py", "--utilisation-only", "10",
                             "--work-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --utilisation-only measures a GPU; no CUDA device here"
    assert "Traceback" not in result.stderr


def test_a_misspelt_step_is_refused_before_anything_runs(tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--only", "utilisaton", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "invalid choice: 'utilisaton'" in last and "'utilisation'" in last and "'cuda-tests'" in last
    assert not (tmp_path / "gpu_report.json").exists()


def test_a_requirement_the_machine_lacks_is_named_before_any_step(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import missing_requirements

    assert missing_requirements(ROOT / "setup.cfg") == []  # this machine has the whole stack
    cfg = tmp_path / "setup.cfg"
    cfg.write_text("[options]\ninstall_requires =\n    torch==2.11.0\n    # a comment\n    no-such-dist-kd==1.0\n"
                   "[options.extras_require]\ndev =\n    pytest==9.2.0\n    also-missing-kd>=2  # why\n")
    assert missing_requirements(cfg) == ["no-such-dist-kd==1.0", "also-missing-kd>=2"]
