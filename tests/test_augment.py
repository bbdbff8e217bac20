"""Waveform augmentation: what each transform does, seeding, and that teacher and student see the
same augmented batch while evaluation sees the clean one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd.audio.augment import WaveformAugment, add_noise, mask_band, mask_time, speed_perturb, time_shift
from kd.config import AugmentConfig

RATE = 8000
ALL_ON = AugmentConfig(enabled=True, speed=0.1, shift_s=0.1, gain_db=6.0, noise_prob=1.0, noise_snr_db=[10.0, 20.0],
                       time_masks=2, time_mask_s=0.05, freq_masks=2, freq_mask_hz=300.0, mixup_alpha=0.4)


def tones(batch: int = 6, seconds: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(RATE * seconds)) / RATE
    return torch.stack([0.3 * torch.sin(2 * torch.pi * (300 + 200 * i) * t) for i in range(batch)])


def test_same_seed_epoch_and_batch_give_the_same_draws():
    x, labels = tones(), torch.arange(6) % 3
    aug = WaveformAugment(ALL_ON, RATE, 3, seed=7)
    a1, t1 = aug(x, labels, epoch=1, index=4)
    a2, t2 = WaveformAugment(ALL_ON, RATE, 3, seed=7)(x, labels, epoch=1, index=4)
    assert torch.equal(a1, a2) and torch.equal(t1, t2)
    for other in (aug(x, labels, epoch=1, index=5)[0], aug(x, labels, epoch=2, index=4)[0],
                  WaveformAugment(ALL_ON, RATE, 3, seed=8)(x, labels, epoch=1, index=4)[0],
                  WaveformAugment(ALL_ON, RATE, 3, seed=7, rank=1)(x, labels, epoch=1, index=4)[0]):
        assert not torch.allclose(a1, other)
    assert not torch.allclose(a1, x) and a1.shape == x.shape and a1.dtype == x.dtype


def test_mixup_targets_are_distributions_led_by_the_clips_own_label():
    cfg = AugmentConfig(enabled=True, speed=0, shift_s=0, gain_db=0, noise_prob=0, time_masks=0, freq_masks=0,
                        mixup_alpha=0.4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    mixed, targets = WaveformAugment(cfg, RATE, 3, seed=0)(tones(), labels, 0, 0)
    assert targets.shape == (6, 3)
    torch.testing.assert_close(targets.sum(-1), torch.ones(6))
    own = targets[torch.arange(6), labels]
    assert bool((own >= 0.5 - 1e-6).all())
    no_mix = AugmentConfig(enabled=True, mixup_alpha=0.0)
    assert WaveformAugment(no_mix, RATE, 3, seed=0)(tones(), labels, 0, 0)[1] is None


def test_time_shift_moves_the_signal_and_fills_with_silence():
    x = torch.zeros(2, 100)
    x[:, 50] = 1.0
    out = time_shift(x, np.array([10, -20]))
    assert out[0].argmax() == 60 and out[1].argmax() == 30 and out.abs().sum() == 2
    ramp = torch.arange(1.0, 11.0)[None]
    assert torch.equal(time_shift(ramp, np.array([3]))[0, :3], torch.zeros(3))


def test_speed_one_is_the_identity_and_faster_speech_is_shorter():
    x = tones(2)
    torch.testing.assert_close(speed_perturb(x, np.array([1.0, 1.0])), x)
    burst = torch.zeros(1, 1000)
    burst[0, 400:600] = 1.0
    faster = speed_perturb(burst, np.array([1.25]))
    assert (faster[0] > 0.5).sum().item() == pytest.approx(160, abs=2)  # 200 samples played 1.25x as fast


def test_time_mask_silences_exactly_the_segment():
    x = torch.ones(2, 50)
    out = mask_time(x, np.array([10, 0]), np.array([5, 0]))
    assert torch.equal(out[0, 10:15], torch.zeros(5)) and out[0].sum() == 45 and out[1].sum() == 50


def test_band_mask_removes_a_tone_inside_the_band_and_keeps_one_outside():
    t = torch.arange(RATE) / RATE
    inside, outside = torch.sin(2 * torch.pi * 1000 * t), torch.sin(2 * torch.pi * 3000 * t)
    out = mask_band(torch.stack([inside + outside]), np.array([800.0]), np.array([1200.0]), RATE)[0]
    torch.testing.assert_close(out, outside, atol=1e-3, rtol=0)


def test_noise_is_added_at_the_requested_snr():
    x = tones(2, 1.0)
    gen = torch.Generator().manual_seed(0)
    out = add_noise(x, np.array([10.0, np.inf]), torch.randn(x.shape, generator=gen))
    noise = out - x
    snr = 10 * torch.log10(x[0].pow(2).mean() / noise[0].pow(2).mean())
    assert snr.item() == pytest.approx(10.0, abs=0.3)
    assert torch.equal(out[1], x[1])  # inf dB: that clip gets no noise


# ---------------------------------------------------------------------------------------------
# In a run


def test_teacher_and_student_get_the_same_augmented_batch_and_evaluation_the_clean_one(tmp_path, tone_data,
                                                                                       monkeypatch):
    from kd.audio.logmel_cnn import LogMelCNN
    from kd.build import build_run
    from kd.config import config_from_dict
    from kd.export.student import save_student
    from kd.trainer import Trainer

    from conftest import TONE_LABELS, tiny_config

    teacher = save_student(LogMelCNN(3, sample_rate=16000, n_mels=16, channels=[8, 16]), tmp_path / "teacher",
                           list(TONE_LABELS))
    cfg = tiny_config(tone_data, teacher, tmp_path / "run", augment={"enabled": True, "mixup_alpha": 0.4},
                      train={"max_steps": 3, "eval_every": 100})
    trainer = Trainer(build_run(config_from_dict(cfg)))
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    for name in seen:
        getattr(trainer, name).register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].clone()))
    clean: list[torch.Tensor] = []
    micro_step = trainer._micro_step

    def recording(batch):
        clean.append(batch["waveform"].clone())
        return micro_step(batch)

    monkeypatch.setattr(trainer, "_micro_step", recording)
    trainer.fit()
    assert len(clean) == 3
    for step in range(3):  # training: one augmented tensor, given to both models
        assert torch.equal(seen["teacher"][step], seen["student"][step])
        assert not torch.allclose(seen["student"][step], clean[step])
    splits = trainer.run.data.splits
    expected = torch.stack([row["waveform"] for role in ("eval", "test") for row in splits[role]])
    for name in seen:  # evaluation (validation, then test): the clean clips, in order
        torch.testing.assert_close(torch.cat(seen[name][3:]), expected, rtol=0, atol=0)


def run_losses(tmp_path, name: str, cfg: dict) -> list[dict]:
    from kd.telemetry import read_events

    from conftest import run_cli, write_config

    result = run_cli(["--config", str(write_config(tmp_path / f"{name}.yaml", cfg))])
    assert result.returncode == 0, result.stderr[-3000:]
    return [e["loss"] for e in read_events(tmp_path / name) if e["type"] == "step"]


@pytest.mark.launches
def test_with_augmentation_off_the_losses_are_the_kits_before_it(tmp_path, tone_data, tiny_teacher):
    """The tiny KD run's first losses with the previous front end and no augmentation are the kit's
    recorded ones; augmentation switched on with every transform at zero changes nothing either.

    Recorded before augmentation existed (commit 89741f5), re-recorded once when the teacher's
    loading and forward stopped drawing from the global random state (the teacher-cache work: the
    student's dropout masks and initial weights no longer depend on whether a teacher runs)."""
    from conftest import tiny_config

    before = [{"total": 0.5768284797668457, "ce": 1.1519120931625366, "kd": 0.001744851702824235},
              {"total": 0.5338148474693298, "ce": 1.0639755725860596, "kd": 0.003654033411294222},
              {"total": 0.5291289687156677, "ce": 1.0504976511001587, "kd": 0.007760302163660526},
              {"total": 0.5859562158584595, "ce": 1.164659023284912, "kd": 0.007253260817378759}]
    off = run_losses(tmp_path, "off", tiny_config(tone_data, tiny_teacher, tmp_path / "off",
                                                  student={"normalize": "batch", "pool": "avg"}))
    zero = {"enabled": True, "speed": 0, "shift_s": 0, "gain_db": 0, "noise_prob": 0, "time_masks": 0,
            "freq_masks": 0, "mixup_alpha": 0}
    idle = run_losses(tmp_path, "idle", tiny_config(tone_data, tiny_teacher, tmp_path / "idle",
                                                    student={"normalize": "batch", "pool": "avg"}, augment=zero))
    for got in (off, idle):
        assert len(got) == len(before)
        for step, (a, b) in enumerate(zip(got, before)):
            for part in ("total", "ce", "kd"):
                assert a[part] == pytest.approx(b[part], rel=1e-4, abs=1e-6), (step, part)


@pytest.mark.launches
def test_augmentation_changes_the_training_losses(tmp_path, tone_data, tiny_teacher):
    from conftest import tiny_config

    plain = run_losses(tmp_path, "plain", tiny_config(tone_data, tiny_teacher, tmp_path / "plain"))
    augmented = run_losses(tmp_path, "aug", tiny_config(tone_data, tiny_teacher, tmp_path / "aug",
                                                        augment={"enabled": True}))
    assert plain[0]["ce"] != pytest.approx(augmented[0]["ce"], rel=1e-3)


@pytest.mark.launches
def test_augmentation_with_teacher_inputs_from_the_clean_clip_is_refused(tmp_path, tone_data, tiny_teacher):
    from conftest import run_cli, tiny_config, write_config

    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run", augment={"enabled": True},
                      data={"features_on_device": False})
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("augment.enabled: the model inputs must be computed from the augmented waveform on the device, but "
            "data.features_on_device is false; set data.features_on_device: true or augment.enabled: false"
            in result.stderr)
    assert not (tmp_path / "run" / "telemetry.jsonl").exists()
