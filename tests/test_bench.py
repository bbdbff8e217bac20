"""Bench helpers that run on any machine: argument errors of bench/bench_fsdd.py and the chart its
--curve draws (bench/curves.py)."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from curves import line_chart  # noqa: E402


def test_a_schedule_below_one_epoch_is_refused_before_anything_runs():
    result = subprocess.run([sys.executable, "bench/bench_fsdd.py", "--curve", "30", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: epochs 0 (--student-epochs / --curve): must be an integer >= 1" in result.stderr


def test_the_curve_chart_marks_each_point_in_its_series_colour(tmp_path):
    red, blue = (200, 60, 30), (40, 90, 200)
    path = line_chart([("KD", red, [(30, 74.0), (100, 78.0)]), ("baseline", blue, [(30, 72.0), (100, 77.0)])],
                      tmp_path / "chart.png", title="t", x_label="epochs", y_label="accuracy", log_x=True,
                      hlines=[("teacher", (90, 90, 90), 76.0)])
    image = Image.open(path).convert("RGB")
    assert image.size == (900, 560)
    colours = {image.getpixel((x, y)) for x in range(image.width) for y in range(0, image.height, 2)}
    assert red in colours and blue in colours and (90, 90, 90) in colours
