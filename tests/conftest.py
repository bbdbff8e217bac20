"""Shared fixtures: tiny models built from configs and tiny datasets made on the spot (no downloads)."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import yaml

ROOT = Path(__file__).resolve().parents[1]
TONE_LABELS = ["high", "low", "mid"]  # sorted: string labels become a ClassLabel in sorted order
TONE_HZ = {"low": 300.0, "mid": 800.0, "high": 2000.0}


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    """Each test session gets its own Hugging Face cache, and nothing reaches the network."""
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def write_tone_dataset(root: Path, per_class: dict[str, int], rate: int = 8000, seed: int = 0) -> Path:
    """An audiofolder of 1 s sine tones (one frequency per class) with noise, string labels in metadata.csv."""
    rng = np.random.default_rng(seed)
    t = np.arange(rate) / rate
    for split, n in per_class.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for label, hz in TONE_HZ.items():
            for i in range(n):
                phase = rng.uniform(0, 2 * np.pi)
                wave = 0.5 * np.sin(2 * np.pi * hz * rng.uniform(0.95, 1.05) * t + phase)
                wave += 0.05 * rng.standard_normal(rate)
                name = f"{label}_{i}.wav"
                soundfile.write(folder / name, wave.astype(np.float32), rate)
                rows.append({"file_name": name, "label": label, "weight": 1.0 + (i % 2)})
        with open(folder / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "label", "weight"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def save_tiny_wav2vec2(path: Path, labels: list[str], seed: int = 0, **overrides: Any) -> Path:
    """A randomly initialised wav2vec2 classifier small enough to run in milliseconds on a CPU."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    torch.manual_seed(seed)
    settings = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                    conv_dim=(16, 16, 16), conv_kernel=(10, 4, 4), conv_stride=(10, 4, 4),
                    num_feat_extract_layers=3, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                    classifier_proj_size=16, num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={n: i for i, n in enumerate(labels)}, mask_time_prob=0.0)
    settings.update(overrides)
    model = Wav2Vec2ForSequenceClassification(Wav2Vec2Config(**settings))
    model.save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=False).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tone_data(tmp_path_factory) -> Path:
    return write_tone_dataset(tmp_path_factory.mktemp("tones"), {"train": 8, "validation": 4, "test": 4})


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return save_tiny_wav2vec2(tmp_path_factory.mktemp("teacher"), TONE_LABELS)


def tiny_config(tone_data: Path, teacher: Path | None, output_dir: Path, **sections: dict[str, Any]) -> dict:
    """A complete config dict for a few-step CPU run on the tone data."""
    cfg = {
        "run": {"name": "tiny", "output_dir": str(output_dir), "seed": 0},
        "data": {"dataset": "audiofolder", "data_dir": str(tone_data), "test_split": "test", "num_workers": 0},
        "teacher": {"model": str(teacher) if teacher else None},
        "student": {"type": "logmel_cnn", "n_mels": 16, "channels": [8, 16]},
        "distillation": {"enabled": teacher is not None, "alpha": 0.5, "temperature": 2.0},
        "train": {"batch_size": 4, "epochs": None, "max_steps": 4, "lr": 0.01, "eval_every": 2},
        "telemetry": {"log_every": 1, "warmup_steps": 0},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, launcher: list[str] | None = None,
            timeout: int = 300):
    """Run train_kd.py in a subprocess (optionally under `accelerate launch`) and return the result."""
    import subprocess

    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train_kd.py")] + args
    return subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def accelerate_launch(num_processes: int = 1, config_file: Path | None = None) -> list[str]:
    """`accelerate launch` with explicit flags, so a developer's own accelerate config cannot leak in."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        launcher += ["--config_file", str(config_file)]
    if num_processes > 1:
        launcher += ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1"]
    else:
        launcher += ["--num_processes", "1", "--num_machines", "1"]
    return launcher + ["--mixed_precision", "no", "--dynamo_backend", "no"]
