"""Augmented views (augment.views): each clip has k fixed augmented versions, so a teacher cache can
store them and augmentation no longer forces the teacher to run every epoch."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from kd.audio.augment import WaveformAugment
from kd.config import AugmentConfig, config_from_dict
from kd.errors import ConfigError
from kd.telemetry import read_events

from conftest import run_cli, tiny_config, write_config

RATE = 8000
ALL_ON = AugmentConfig(enabled=True, noise_prob=1.0, views=3)


def clips(n: int = 6) -> torch.Tensor:
    t = torch.arange(RATE // 2) / RATE
    return torch.stack([torch.sin(2 * torch.pi * (200 + 100 * i) * t) for i in range(n)])


def test_a_clips_version_depends_on_its_view_alone_not_on_its_batch_or_process():
    x, labels = clips(), torch.zeros(6, dtype=torch.long)
    whole, _ = WaveformAugment(ALL_ON, RATE, 3, seed=7)(x, labels, epoch=1, index=0, clips=list(range(6)))
    # The same clips in another order, split across two batches at other batch positions, on another process.
    order = [4, 1, 5, 0, 3, 2]
    other = WaveformAugment(ALL_ON, RATE, 3, seed=7, rank=1)
    first, _ = other(x[order[:2]], labels[:2], epoch=4, index=9, clips=order[:2])  # epoch 4: view 1 again
    rest, _ = other(x[order[2:]], labels[4:], epoch=1, index=3, clips=order[2:])
    torch.testing.assert_close(torch.cat([first, rest]), whole[order], rtol=0, atol=0)
    assert not torch.allclose(whole, x)
    # Another view, or another seed, is another version.
    for changed in (WaveformAugment(ALL_ON, RATE, 3, seed=7)(x, labels, epoch=2, index=0, clips=list(range(6)))[0],
                    WaveformAugment(ALL_ON, RATE, 3, seed=8)(x, labels, epoch=1, index=0, clips=list(range(6)))[0]):
        assert all(not torch.allclose(a, b) for a, b in zip(changed, whole))
    with pytest.raises(ValueError, match="dataset indices"):
        WaveformAugment(ALL_ON, RATE, 3, seed=7)(x, labels, epoch=0, index=0)


@pytest.mark.parametrize(("augment", "distillation", "message"), [
    ({"views": -1}, {}, "augment.views: -1 is not allowed; must be an integer >= 0"),
    ({"views": 2, "mixup_alpha": 0.4}, {}, "augment.views: 2 cannot be combined with augment.mixup_alpha: 0.4"),
    ({"views": 0}, {"teacher_cache": "require"}, "set augment.views (e.g. 4"),
])
def test_view_settings_that_cannot_work_are_refused(tmp_path, tone_data, tiny_teacher, augment, distillation, message):
    cfg = tiny_config(tone_data, tiny_teacher, tmp_path, augment={"enabled": True, **augment},
                      distillation=distillation)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config_from_dict(cfg)


def _losses(run_dir) -> list[float]:
    return [e["loss"]["total"] for e in read_events(run_dir / "telemetry.jsonl") if e["type"] == "step"]


@pytest.mark.launches
def test_cached_views_train_as_the_teacher_online_would_and_free_it_after_epoch_one(tmp_path, tone_data,
                                                                                 tiny_teacher):
    """Three epochs over two views: with the cache, epoch 1 stores view 0 as it trains and its end stores
    view 1 (the fill augments as training will); the losses equal a run with the teacher on every batch,
    epoch 3 (view 0 again) is all hits, and a `require` run never loads the teacher."""
    cache = tmp_path / "cache"

    def run(name: str, mode: str, views: int = 2, **extra) -> object:
        cfg = tiny_config(tone_data, tiny_teacher, tmp_path / name, augment={"enabled": True, "views": views},
                          distillation={"teacher_cache": mode, "cache_dir": str(cache)},
                          train={"max_steps": None, "epochs": 3, "eval_every": 100}, **extra)
        result = run_cli(["--config", str(write_config(tmp_path / f"{name}.yaml", cfg))])
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    run("online", "off")
    auto = run("auto", "auto")
    run("require", "require")
    online, cached, again = (_losses(tmp_path / n) for n in ("online", "auto", "require"))
    assert len(online) == 18  # 3 epochs of 6 steps
    assert cached == pytest.approx(online, rel=1e-5, abs=1e-6)
    assert again == cached
    assert "2 fixed version(s) of each clip" in auto.stdout and "the teacher is released" in auto.stdout
    assert "Teacher cache off" not in auto.stdout
    steps = [e for e in read_events(tmp_path / "auto" / "telemetry.jsonl") if e["type"] == "step"]
    assert sum(e["cache"]["misses"] for e in steps[:6]) == 24  # epoch 1: view 0 computed as it trains
    assert all(e["cache"]["hits"] == 4 and e["cache"]["misses"] == 0 for e in steps[6:])
    assert steps[-1]["cache"]["covered"] == {"eval": [12, 12], "test": [12, 12], "train@0": [24, 24],
                                             "train@1": [24, 24]}
    # The monitor counts the views together while the cache fills.
    from kd.tui.state import RunState, summary_text

    state = RunState()
    for event in read_events(tmp_path / "auto" / "telemetry.jsonl"):
        state.apply(event)
        if event["type"] == "step" and event["step"] == 3:
            assert "teacher: filling the cache 12/72 (train 12/48 in 2 views)" in summary_text(state)
    assert "teacher: cached 72/72 (not in memory)" in summary_text(state)
    start = next(e for e in read_events(tmp_path / "require" / "telemetry.jsonl") if e["type"] == "run_start")
    assert start["soft_targets"]["source"] == "cache" and start["params"]["teacher"] is None
    with sqlite3.connect(next(cache.glob("*.sqlite"))) as db:
        assert db.execute("SELECT COUNT(*) FROM logits").fetchone()[0] == 2 * 24 + 12 + 12
    # Another seed draws other versions: its views are misses, the clean splits are shared.
    other = run("seed1", "auto", run={"name": "tiny", "output_dir": str(tmp_path / "seed1"), "seed": 1})
    assert "train@0 0/24, train@1 0/24, eval 12/12, test 12/12" in other.stdout
    # More views keep those already stored: a clip's version v does not depend on how many there are.
    more = run("views3", "auto", views=3)
    assert "train@0 24/24, train@1 24/24, train@2 0/24, eval 12/12, test 12/12" in more.stdout


@pytest.mark.launches
def test_precompute_fills_every_view(tmp_path, tone_data, tiny_teacher):
    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run", augment={"enabled": True, "views": 3},
                      distillation={"teacher_cache": "require"})
    config = write_config(tmp_path / "c.yaml", cfg)
    result = run_cli(["--config", str(config), "--precompute-teacher"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train@0 24/24, train@1 24/24, train@2 24/24" in result.stdout
    trained = run_cli(["--config", str(config)])
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "complete: the teacher is not loaded" in trained.stdout


@pytest.mark.launches
def test_two_processes_store_and_fill_views_as_one_process_computes_them_online(tmp_path, tone_data, tiny_teacher):
    """Two CPU processes: a clip's version does not depend on the process that draws it, so each
    process stores the views of its own batches, the end of epoch 1 splits the rest between them, and
    the losses are those of the teacher run online on the same views."""
    from conftest import accelerate_launch, once_more_if_hung

    losses = {}
    for mode in ("off", "auto"):
        def attempt(n, mode=mode):  # each attempt its own run folder and cache; a hung launch is retried once
            base = tmp_path / f"{mode}-try{n}"
            cfg = tiny_config(tone_data, tiny_teacher, base / "run", augment={"enabled": True, "views": 2},
                              distillation={"teacher_cache": mode, "cache_dir": str(base / "cache")},
                              train={"max_steps": None, "epochs": 3, "eval_every": 100})
            base.mkdir()
            return run_cli(["--config", str(write_config(base / "c.yaml", cfg))], launcher=accelerate_launch(2),
                           env={"ACCELERATE_USE_CPU": "true"}, timeout=150)

        n, result = once_more_if_hung(attempt)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[mode] = _losses(tmp_path / f"{mode}-try{n}" / "run")
        if mode == "auto":
            events = read_events(tmp_path / f"auto-try{n}" / "run" / "telemetry.jsonl")
            steps = [e for e in events if e["type"] == "step"]
            assert steps[-1]["cache"]["source"] == "cache"
            assert steps[-1]["cache"]["covered"] == {"train@0": [24, 24], "train@1": [24, 24], "eval": [12, 12],
                                                     "test": [12, 12]}
    assert len(losses["off"]) == 9  # 3 epochs of 3 steps (2 processes x batches of 4)
    assert losses["auto"] == pytest.approx(losses["off"], rel=1e-5, abs=1e-6)
