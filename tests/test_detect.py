"""The streaming detector: an exported model over a long recording, with no torch in the process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from kd.synthetic import TONE_HZ, TONE_LABELS

pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parents[1]
RATE = 8000


BURST_S = 0.4  # each "word": a tapered tone this long
FLOOR = 0.001  # background noise, about -60 dBFS


def burst(label: str, rng: np.random.Generator) -> np.ndarray:
    n = int(BURST_S * RATE)
    t = np.arange(n) / RATE
    wave = 0.5 * np.sin(2 * np.pi * TONE_HZ[label] * rng.uniform(0.95, 1.05) * t + rng.uniform(0, 2 * np.pi))
    return (wave * np.hanning(n)).astype(np.float32)


def clip(label: str, rng: np.random.Generator) -> np.ndarray:
    """A training clip for streaming: the word anywhere in a 1 s window over noise, up to half of it cut
    off at either edge (as a sliding window sees it)."""
    n = int(BURST_S * RATE)
    padded = (FLOOR * rng.standard_normal(RATE + n)).astype(np.float32)
    start = int(rng.integers(0, RATE + 1))  # the window is padded[n // 2 : n // 2 + RATE]
    padded[start: start + n] += burst(label, rng)
    return padded[n // 2: n // 2 + RATE]


@pytest.fixture(scope="module")
def tone_model(tmp_path_factory) -> Path:
    """A log-mel CNN trained in seconds to tell the three tones apart, exported with the kit."""
    from kd.audio.logmel_cnn import LogMelCNN
    from kd.export.onnx import export_onnx

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = LogMelCNN(len(TONE_LABELS), RATE, n_mels=16, channels=[8, 16])
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(250):
        labels = rng.integers(0, len(TONE_LABELS), 16)
        clips = torch.from_numpy(np.stack([clip(TONE_LABELS[i], rng) for i in labels]))
        loss = torch.nn.functional.cross_entropy(model(clips), torch.from_numpy(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("detector")
    check = {"waveform": torch.from_numpy(np.stack([clip(name, rng) for name in TONE_LABELS]))}
    export_onnx(model, None, check, folder, metadata={"kd.labels": TONE_LABELS, "kd.sample_rate": RATE,
                                             "kd.window_samples": RATE, "kd.hop_samples": RATE // 10})
    return folder / "model.onnx"


def detect_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    # The detector ships without torch: the process fails if anything imports it.
    code = ("import sys; sys.modules['torch'] = None; from kd.export.detect import main; "
            "sys.argv[0] = 'kd.export.detect'; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True, cwd=ROOT,
                          timeout=120)


def test_words_in_a_long_recording_are_found_at_their_times(tone_model, tmp_path):
    rng = np.random.default_rng(1)
    plan = [(1.0, "low"), (3.5, "high"), (6.0, "mid"), (8.3, "low")]  # (start s, tone), silence between
    audio = (FLOOR * rng.standard_normal(int(11 * RATE))).astype(np.float32)
    for start, label in plan:
        audio[int(start * RATE): int(start * RATE) + int(BURST_S * RATE)] += burst(label, rng)
    path = tmp_path / "long.wav"
    soundfile.write(path, audio, RATE)
    result = detect_cli(str(tone_model), str(path))
    assert result.returncode == 0, result.stderr.decode()
    found = [line.split() for line in result.stdout.decode().splitlines()]
    assert [f[2] for f in found] == [label for _, label in plan], result.stdout.decode()
    for (start, _), f in zip(plan, found):
        assert abs(float(f[0]) - (start + BURST_S / 2)) <= 0.1  # the word's middle, within one hop
        assert float(f[3]) >= 0.8

    # the same file as FLAC through stdin, at 16 kHz (resampled), and with a longer refractory period
    flac = tmp_path / "long.flac"
    soundfile.write(flac, np.interp(np.arange(2 * audio.size) / 2, np.arange(audio.size), audio), 2 * RATE)
    result = detect_cli(str(tone_model), "-", "--refractory-s", "3", stdin=flac.read_bytes())
    assert result.returncode == 0, result.stderr.decode()
    assert "resampled 16000 Hz -> 8000 Hz" in result.stderr.decode()
    assert [line.split()[2] for line in result.stdout.decode().splitlines()] == ["low", "mid"]  # 3.5 and 8.3 dropped


def test_bad_input_is_one_line_and_exit_2(tone_model, tmp_path):
    cases = [
        ((str(tone_model), str(tmp_path / "none.wav")), "none.wav: no such file"),
        ((str(tmp_path / "none.onnx"), str(tone_model)), "none.onnx: no such file"),
        ((str(tone_model), str(tone_model)), "cannot read audio"),
        ((str(tone_model), str(tone_model), "--threshold", "0"), "--threshold 0.0: must be in (0, 1]"),
    ]
    for args, fragment in cases:
        result = detect_cli(*args)
        err = result.stderr.decode().strip().splitlines()
        assert result.returncode == 2 and len(err) == 1 and fragment in err[0], (args, err)
