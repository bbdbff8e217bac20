"""The demo's offline speech synthesis and its voice-disjoint keyword dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile

pytest.importorskip("espeakng_loader")

from kd.demo.kws_data import KEYWORDS, build_kws_dataset  # noqa: E402
from kd.demo.speech import ESpeak  # noqa: E402


def test_espeak_speaks_offline():
    engine = ESpeak()
    wave = engine.synthesize("left", "en-us+f3", rate_wpm=150, pitch=60)
    assert engine.sample_rate == 22050
    assert wave.dtype == np.float32 and 0.2 * engine.sample_rate < wave.size < 2 * engine.sample_rate
    assert 0.05 < np.abs(wave).max() <= 1.0
    with pytest.raises(ValueError, match="no voice"):
        engine.synthesize("left", "xx-nonexistent")


def test_dataset_splits_by_voice_and_is_reproducible(tmp_path):
    root = build_kws_dataset(tmp_path / "kws", variants_per_accent=1, takes=1, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    voices = manifest["voices"]
    assert sum(len(v) for v in voices.values()) == 8  # 8 accents x 1 variant
    assert not set(voices["train"]) & set(voices["test"]) and not set(voices["train"]) & set(voices["validation"])
    assert manifest["counts"]["train"] == len(voices["train"]) * len(KEYWORDS)
    rows = (root / "test" / "metadata.csv").read_text().splitlines()
    assert rows[0] == "file_name,label,voice,rate_wpm,pitch"
    first = rows[1].split(",")[0]
    audio, rate = soundfile.read(root / "test" / first)
    assert rate == 16000 and audio.shape == (16000,)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    build_kws_dataset(tmp_path / "kws", variants_per_accent=1, takes=1, progress=False)
    assert (root / "manifest.json").stat().st_mtime_ns == stamp  # same settings: nothing rebuilt
    again = build_kws_dataset(tmp_path / "again", variants_per_accent=1, takes=1, progress=False)
    assert np.array_equal(soundfile.read(again / "test" / first)[0], audio)  # fixed seed


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo's own dataset (same settings as `make demo`: 3200 clips, 160 voices)."""
    return build_kws_dataset(tmp_path_factory.mktemp("demo") / "kws", progress=False)


@pytest.mark.launches
def test_demo_data_is_the_same_in_two_fresh_processes(tmp_path):
    """`make demo` builds its data in a fresh process; two such builds must be byte-identical for its
    table to repeat. eSpeak's noisy voices draw from its generator and libc's rand(), whose state
    other libraries in the process also move: unseeded, two builds differed in 240 of 3200 clips.
    (Within one process, earlier syntheses still shape later ones: eSpeak keeps more state.)"""
    import hashlib
    import subprocess
    import sys

    def build(name: str) -> dict:
        code = ("from kd.demo.kws_data import build_kws_dataset; "
                f"build_kws_dataset({str(tmp_path / name)!r}, progress=False)")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        root = tmp_path / name
        return {p.relative_to(root): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.wav"))}

    first, second = build("a"), build("b")
    assert len(first) == 3200 and first.keys() == second.keys()
    differing = [str(name) for name in first if first[name] != second[name]]
    assert not differing, f"{len(differing)} clips differ, e.g. {differing[:3]}"


@pytest.mark.launches
def test_demo_student_is_robust_to_recording_level(demo_data, tmp_path):
    """The demo's baseline config, trained three epochs by the CLI; on the demo's test clips (unseen
    voices) its exported student predicts the same word at 0.1x and 10x the recording level."""
    import torch

    from kd.data import load_waveform
    from kd.export.student import load_student

    from conftest import run_cli

    out = tmp_path / "run"
    result = run_cli(["--config", "configs/demo_baseline.yaml", f"data.data_dir={demo_data}", f"run.output_dir={out}",
                      "train.epochs=3", "data.test_split=null", "data.eval_split=null", "data.num_workers=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    model, labels = load_student(out / "student")
    rows = (demo_data / "test" / "metadata.csv").read_text().splitlines()[1:]
    waves = torch.stack([torch.from_numpy(load_waveform(str(demo_data / "test" / r.split(",")[0]), 8000, 8000))
                         for r in rows])
    assert len(waves) == 480
    with torch.no_grad():
        base = model(waves).argmax(-1)
        for gain in (0.1, 10.0):
            same = (model(waves * gain).argmax(-1) == base).float().mean().item()
            assert same >= 0.99, (gain, same)
    truth = torch.tensor([labels.index(r.split(",")[1]) for r in rows])
    assert (base == truth).float().mean() > 0.3  # it learned something (chance: 10%), so agreeing is not trivial
