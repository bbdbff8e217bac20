"""A keyword-spotting dataset synthesised offline: 10 keywords, many voices, noise, split by voice.

Each voice is an eSpeak accent combined with a voice variant; every clip gets its own speaking rate,
pitch, position in the 1 s window, gain and background noise. Train, validation and test use
disjoint voices, so test accuracy measures generalisation to unseen speakers. The output is an
`audiofolder` (train/validation/test folders with metadata.csv) read by `load_dataset`.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio

from kd.demo.speech import ESpeak

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")
SPLITS = (("train", 0.70), ("validation", 0.15), ("test", 0.15))


def build_kws_dataset(root: str | Path, variants_per_accent: int = 20, takes: int = 2, sample_rate: int = 16000,
                      snr_db: tuple[float, float] = (5.0, 30.0), seed: int = 0, progress: bool = True) -> Path:
    """Write the dataset under `root` (skipped when a dataset with the same settings is there)."""
    root = Path(root)
    settings = {"keywords": KEYWORDS, "accents": ACCENTS, "variants_per_accent": variants_per_accent,
                "takes": takes, "sample_rate": sample_rate, "snr_db": snr_db, "seed": seed, "version": 2}
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("settings") == json.loads(json.dumps(settings)):
        return root
    for split, _ in SPLITS:  # settings changed (or a partial build): start from empty folders
        shutil.rmtree(root / split, ignore_errors=True)
    manifest.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    engine = ESpeak()
    variants = [v for v in engine.variants() if " " not in v]
    voices = [f"{accent}+{v}" for accent in ACCENTS
              for v in rng.choice(variants, size=min(variants_per_accent, len(variants)), replace=False)]
    rng.shuffle(voices)
    split_of, start = {}, 0
    for i, (split, share) in enumerate(SPLITS):
        end = len(voices) if i == len(SPLITS) - 1 else start + int(round(share * len(voices)))
        split_of.update({v: split for v in voices[start:end]})
        start = end
    rows: dict[str, list[dict]] = {split: [] for split, _ in SPLITS}
    total = len(voices) * len(KEYWORDS) * takes
    done = 0
    for voice in voices:
        split = split_of[voice]
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for word in KEYWORDS:
            for take in range(takes):
                rate_wpm, pitch = int(rng.integers(110, 230)), int(rng.integers(15, 85))
                speech = engine.synthesize(word, voice, rate_wpm=rate_wpm, pitch=pitch,
                                           pitch_range=int(rng.integers(20, 80)), seed=int(rng.integers(2**31)))
                clip = place_in_window(speech, engine.sample_rate, sample_rate, rng, snr_db=snr_db)
                name = f"{word}_{voice.replace('+', '_')}_{take}.wav"
                soundfile.write(folder / name, clip, sample_rate, subtype="PCM_16")
                rows[split].append({"file_name": name, "label": word, "voice": voice,
                                    "rate_wpm": rate_wpm, "pitch": pitch})
                done += 1
        if progress:
            print(f"\rSynthesising keywords: {done}/{total} clips", end="", flush=True)
    if progress:
        print()
    for split, items in rows.items():
        with open(root / split / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(items[0]))
            writer.writeheader()
            writer.writerows(items)
    counts = {split: len(items) for split, items in rows.items()}
    voices_by_split = {split: sorted({r["voice"] for r in items}) for split, items in rows.items()}
    manifest.write_text(json.dumps({"settings": settings, "counts": counts, "voices": voices_by_split}, indent=1))
    return root


def place_in_window(speech: np.ndarray, speech_rate: int, rate: int, rng: np.random.Generator,
                    *, snr_db: tuple[float, float]) -> np.ndarray:
    """Resample, put the word at a random offset in a 1 s clip, scale it, and add coloured noise."""
    wave = torchaudio.functional.resample(torch.from_numpy(speech), speech_rate, rate).numpy()
    voiced = np.flatnonzero(np.abs(wave) > 0.02 * (np.abs(wave).max() + 1e-9))
    if voiced.size:
        wave = wave[voiced[0]: voiced[-1] + 1]  # trim eSpeak's leading and trailing silence
    wave = wave[:rate]
    clip = np.zeros(rate, np.float32)
    offset = int(rng.integers(0, rate - wave.size + 1))
    clip[offset: offset + wave.size] = wave * rng.uniform(0.3, 1.0) / (np.abs(wave).max() + 1e-9)
    white = rng.standard_normal(rate).astype(np.float32)
    brown = np.cumsum(rng.standard_normal(rate)).astype(np.float32)
    brown -= brown.mean()
    noise = rng.uniform(0, 1) * white / white.std() + rng.uniform(0, 1) * brown / (brown.std() + 1e-9)
    signal_power = np.mean(clip[offset: offset + wave.size] ** 2) + 1e-12
    snr = rng.uniform(*snr_db)
    noise *= np.sqrt(signal_power / (10 ** (snr / 10)) / (np.mean(noise**2) + 1e-12))
    return np.clip(clip + noise, -1.0, 1.0).astype(np.float32)
