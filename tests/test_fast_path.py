"""The throughput switches change speed, not results: on-device features equal the extractors,
decoding on access equals the decode cache, and a run's first losses are the same either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ASTFeatureExtractor, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

from kd.audio.features import ASTInputs, Wav2Vec2Inputs, device_features
from kd.config import DataConfig
from kd.data import prepare_data
from kd.students import LogMelCNN, use_channels_last
from kd.telemetry import read_events

from conftest import run_cli, tiny_config, write_config, write_tone_dataset


def clips(n: int, samples: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    waves = (0.1 * rng.standard_normal((n, samples))).astype(np.float32)
    waves[1, samples // 2:] = 0.0  # a padded clip: all-zero frames hit the log floor
    return waves


@pytest.mark.parametrize("rate, bins, max_length, seconds", [
    (16000, 128, 128, 1.0),   # the flagship AST (Speech Commands): 98 frames padded to 128
    (8000, 64, 40, 0.6),      # another rate and bank count; 58 frames cut to 40
])
def test_ast_filterbank_on_device_matches_the_extractor(rate, bins, max_length, seconds):
    extractor = ASTFeatureExtractor(sampling_rate=rate, num_mel_bins=bins, max_length=max_length)
    waves = clips(4, int(rate * seconds))
    expected = extractor(list(waves), sampling_rate=rate, return_tensors="pt")["input_values"]
    module = device_features(extractor)
    assert isinstance(module, ASTInputs)
    got = module(torch.from_numpy(waves))["input_values"]
    assert got.shape == expected.shape == (4, max_length, bins)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)  # |values| up to ~3: fp32 FFT/log rounding


@pytest.mark.parametrize("normalize, mask", [(True, False), (True, True), (False, False)])
def test_wav2vec2_inputs_on_device_match_the_extractor(normalize, mask):
    extractor = Wav2Vec2FeatureExtractor(do_normalize=normalize, return_attention_mask=mask)
    waves = clips(3, 16000)
    expected = extractor(list(waves), sampling_rate=16000, return_tensors="pt")
    module = device_features(extractor)
    assert isinstance(module, Wav2Vec2Inputs)
    got = module(torch.from_numpy(waves))
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)


def test_unsupported_extractors_stay_on_the_cpu():
    assert device_features(WhisperFeatureExtractor()) is None
    assert device_features(None) is None

    class Custom(ASTFeatureExtractor):  # a subclass may compute something else: not assumed
        pass

    assert device_features(Custom()) is None


def test_decode_on_access_gives_the_cached_waveforms(tone_data):
    cfg = dict(dataset="audiofolder", data_dir=str(tone_data), test_split="test", num_workers=0)
    cached = prepare_data(DataConfig(**cfg), sampling_rate=8000).splits["train"]
    streamed = prepare_data(DataConfig(**cfg, decode_cache=False), sampling_rate=8000).splits["train"]
    assert streamed.cache_files == [] or streamed.cache_files != cached.cache_files
    for i in (0, 5, len(cached) - 1):
        assert torch.equal(streamed[i]["waveform"], cached[i]["waveform"])
        assert int(streamed[i]["label"]) == int(cached[i]["label"])


def test_channels_last_keeps_a_training_step():
    """Same logits, loss and gradients in NCHW and NHWC (on the CPU here; CUDA kernels differ more)."""
    torch.manual_seed(0)
    wave, labels = torch.randn(4, 8000), torch.tensor([0, 1, 2, 3])
    grads = []
    for channels_last in (False, True):
        torch.manual_seed(1)
        model = LogMelCNN(4, sample_rate=8000, n_mels=16, channels=[8, 16], dropout=0.0)
        if channels_last:
            assert use_channels_last(model)
        loss = torch.nn.functional.cross_entropy(model(wave), labels)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


PLAIN = {"num_workers": 0, "persistent_workers": False, "pin_memory": False, "decode_cache": False,
         "features_on_device": False}
FAST = {"num_workers": 2, "persistent_workers": True, "prefetch_factor": 2, "pin_memory": True, "decode_cache": True,
        "features_on_device": True}


def step_losses(tmp_path, name, tone_data, teacher, data, student, steps=8, compile=False) -> list[dict]:
    cfg = tiny_config(tone_data, teacher, tmp_path / name, data=data, student=student,
                      train={"max_steps": steps, "eval_every": 100, "compile": compile})
    result = run_cli(["--config", str(write_config(tmp_path / f"{name}.yaml", cfg))])
    assert result.returncode == 0, result.stderr[-3000:]
    return [e["loss"] for e in read_events(tmp_path / name / "telemetry.jsonl") if e["type"] == "step"]


@pytest.mark.launches
def test_fast_data_path_leaves_the_losses_unchanged(tmp_path, tone_data, tiny_teacher):
    """Workers (persistent, prefetching), the decode cache, pinned memory and on-device features
    against the plain path: the first eight steps, over two epochs, give the same losses."""
    # Eight steps of four samples: the whole first epoch (six steps) and the start of the second.
    plain = step_losses(tmp_path, "plain", tone_data, tiny_teacher, PLAIN, {"channels_last": False})
    fast = step_losses(tmp_path, "fast", tone_data, tiny_teacher, FAST, {"channels_last": True})
    assert len(plain) == len(fast) == 8
    for a, b in zip(plain, fast):
        for part in ("total", "ce", "kd"):
            assert b[part] == pytest.approx(a[part], rel=1e-5, abs=1e-6), (part, a, b)


@pytest.mark.launches
def test_broken_file_found_while_decoding_on_access_is_one_line(tmp_path, tiny_teacher):
    root = write_tone_dataset(tmp_path / "d", {"train": 8, "validation": 2, "test": 2})
    (root / "train" / "high_1.wav").write_bytes(b"not audio at all")
    cfg = tiny_config(root, tiny_teacher, tmp_path / "run", data={"decode_cache": False, "num_workers": 2})
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))])
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot decode audio") and "high_1.wav" in last
    assert "Traceback" not in result.stderr


@pytest.mark.launches
def test_compiled_student_trains_the_same_and_exports_plain_weights(tmp_path, tone_data, tiny_teacher):
    """train.compile through Accelerate's dynamo plugin. Dropout off: inductor draws its own random
    numbers, so with dropout the masks (not the arithmetic) would differ from eager mode."""
    student = {"dropout": 0.0}
    eager = step_losses(tmp_path, "eager", tone_data, tiny_teacher, {}, student, steps=3)
    compiled = step_losses(tmp_path, "compiled", tone_data, tiny_teacher, {}, student, steps=3, compile=True)
    for a, b in zip(eager, compiled):
        assert b["total"] == pytest.approx(a["total"], rel=1e-4)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "compiled" / "student" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("_orig_mod" in k for k in keys)  # the export is the plain module's state
