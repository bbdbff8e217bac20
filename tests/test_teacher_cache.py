"""The teacher-output cache: exactness against online KD, keys that never serve stale rows, errors, resume."""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kd.config import config_from_dict
from kd.data import content_fingerprint, load_raw_splits
from kd.errors import ConfigError
from kd.teachers.identity import teacher_identity
from kd.teachers.store import CacheError, TeacherCache, identity_key
from kd.telemetry import read_events

from conftest import ROOT, accelerate_launch, once_more_if_hung, run_cli, tiny_config, write_config


def _config(tmp_path: Path, tone_data: Path, teacher: Path, name: str, **distillation) -> Path:
    dist = {"cache_dir": str(tmp_path / "cache"), **distillation}
    cfg = tiny_config(tone_data, teacher, tmp_path / name, distillation=dist,
                      train={"max_steps": None, "epochs": 2, "eval_every": 100})
    return write_config(tmp_path / f"{name}.yaml", cfg)


def _losses(run_dir: Path) -> list[float]:
    return [e["loss"]["total"] for e in read_events(run_dir / "telemetry.jsonl") if e["type"] == "step"]


@pytest.mark.launches
def test_cached_training_equals_online_training(tmp_path, tone_data, tiny_teacher):
    """Epoch 1 fills the cache, epoch 2 trains from it: the same losses as a run with the teacher on
    every batch; a later `require` run never loads the teacher and reproduces them exactly."""
    runs = {}
    for mode in ("off", "auto", "require"):
        result = run_cli(["--config", str(_config(tmp_path, tone_data, tiny_teacher, mode, teacher_cache=mode))])
        assert result.returncode == 0, result.stderr[-2000:]
        runs[mode] = result
    online, cached, required = (_losses(tmp_path / m) for m in ("off", "auto", "require"))
    assert len(online) == 12  # 2 epochs of 6 steps
    assert cached == pytest.approx(online, rel=1e-5, abs=1e-6)
    assert required == cached  # bit for bit: both read the same fp32 rows
    assert "the teacher is released" in runs["auto"].stdout
    events = read_events(tmp_path / "require" / "telemetry.jsonl")
    start = next(e for e in events if e["type"] == "run_start")
    assert start["soft_targets"]["source"] == "cache"
    assert start["soft_targets"]["coverage"] == {"train": [24, 24], "eval": [12, 12], "test": [12, 12]}
    assert start["params"]["teacher"] is None and start["estimate"]["teacher_weights"] == 0  # not in memory
    steps = [e for e in events if e["type"] == "step"]
    assert all(e["cache"]["hits"] == 4 and e["cache"]["misses"] == 0 for e in steps)
    auto_steps = [e for e in read_events(tmp_path / "auto" / "telemetry.jsonl") if e["type"] == "step"]
    assert auto_steps[0]["cache"]["misses"] == 4 and auto_steps[-1]["cache"]["source"] == "cache"
    # The monitor says where soft targets come from: filling during epoch 1, cached after it.
    from kd.tui.state import RunState, summary_text

    state = RunState()
    for event in read_events(tmp_path / "auto" / "telemetry.jsonl"):
        state.apply(event)
        if event["type"] == "step" and event["step"] == 3:
            assert "teacher: filling the cache 12/48 (train 12/24)" in summary_text(state)
    assert "teacher: cached 48/48 (not in memory)" in summary_text(state)
    once = subprocess.run([sys.executable, str(ROOT / "monitor_tui.py"), str(tmp_path / "off"), "--once"],
                          capture_output=True, text=True, timeout=60)
    assert "teacher: online" in once.stdout, once.stderr
    # Evaluation's teacher accuracy comes from the cache too.
    evals = [[e["metrics"]["teacher_acc"] for e in read_events(tmp_path / m / "telemetry.jsonl") if e["type"] == "eval"]
             for m in ("off", "require")]
    assert evals[0] == evals[1]


def test_require_with_incomplete_cache_refuses_and_never_loads_the_teacher(tmp_path, tone_data, tiny_teacher,
                                                                            monkeypatch):
    import kd.teachers.factory
    from kd.build import build_run

    def forbidden(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(kd.teachers.factory, "load_teacher", forbidden)
    cfg = config_from_dict(tiny_config(tone_data, tiny_teacher, tmp_path / "run",
                                       distillation={"cache_dir": str(tmp_path / "cache"), "teacher_cache": "require"}))
    with pytest.raises(CacheError, match=r"no cache for this teacher.*--precompute-teacher"):
        build_run(cfg)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing created
    # A cache that exists but lacks rows: refused too, naming the coverage, still without the teacher.
    from accelerate.state import AcceleratorState

    from kd.data import prepare_data
    from kd.teachers.cached import open_cache
    from kd.teachers.loading import load_processor

    processor = load_processor(str(tiny_teacher), "audio")
    data = prepare_data(cfg.data, processor, processor.sampling_rate)
    identity = teacher_identity(cfg, processor, sampling_rate=data.sampling_rate, device_kind="cpu",
                                features_on_device=data.features is not None)
    sizes = {role: len(ds) for role, ds in data.splits.items()}
    cache, split_ids = open_cache(cfg, identity, num_outputs=len(data.label_names), label_names=data.label_names,
                                  fingerprints=data.fingerprints, sizes=sizes,
                                  may_create=True)
    cache.put(split_ids["train"], [0, 1], torch.zeros(2, len(data.label_names)))
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(CacheError, match=r"is incomplete \(train 2/24, eval 0/12, test 0/12\)"):
        build_run(cfg)


@pytest.mark.launches
def test_interrupted_precompute_resumes_and_two_processes_write_each_sample_once(tmp_path, tone_data, tiny_teacher):
    def attempt(n):  # each attempt its own folder and cache; a hung launch is retried once
        base = tmp_path / f"try{n}"
        base.mkdir()
        config = _config(base, tone_data, tiny_teacher, "pre", teacher_cache="require")
        # A fill that stopped part-way: only the first 5 training rows are stored.
        first = run_cli(["--config", str(config), "--precompute-teacher"])
        assert first.returncode == 0, first.stderr[-2000:]
        assert not (base / "pre").exists()  # a fill writes nothing into the run folder
        path = next((base / "cache").glob("*.sqlite"))
        with sqlite3.connect(path) as db:
            db.execute("DELETE FROM logits WHERE NOT (split_id LIKE 'train:%' AND idx < 5)")
        return run_cli(["--config", str(config), "--precompute-teacher"],
                       launcher=accelerate_launch(2), env={"ACCELERATE_USE_CPU": "true"}, timeout=150)

    _, again = once_more_if_hung(attempt)
    assert again.returncode == 0, again.stderr[-3000:]
    counts = [int(n) for n in re.findall(r"(\d+) soft targets computed by process", again.stdout)]
    assert len(counts) == 2 and sum(counts) == 24 + 12 + 12 - 5  # only the missing ones, none twice
    assert "coverage train 24/24, eval 12/12, test 12/12" in again.stdout


@pytest.mark.launches
def test_a_teacher_whose_labels_differ_from_the_data_is_named_before_any_cache_advice(tmp_path, tone_data,
                                                                                      tiny_teacher):
    """The same teacher on a dataset naming other classes: the labels are the error, not the cache
    (whose advice to delete it would cost a valid cache shared with other runs), and the cache stays."""
    filled = run_cli(["--config", str(_config(tmp_path, tone_data, tiny_teacher, "fill", teacher_cache="auto")),
                      "train.epochs=1"])
    assert filled.returncode == 0, filled.stderr[-2000:]
    caches = sorted((tmp_path / "cache").rglob("*.sqlite"))
    assert caches
    renamed = tmp_path / "renamed"
    shutil.copytree(tone_data, renamed)
    for meta in renamed.glob("*/metadata.csv"):
        meta.write_text(meta.read_text().replace(",high,", ",treble,"))
    other = run_cli(["--config", str(_config(tmp_path, renamed, tiny_teacher, "other", teacher_cache="auto"))])
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert re.search(r"the dataset has treble that it does not predict; it predicts high that the dataset lacks",
                     other.stderr), other.stderr
    assert "cache" not in other.stderr and sorted((tmp_path / "cache").rglob("*.sqlite")) == caches


def test_a_changed_teacher_dtype_rate_or_dataset_is_a_miss(tmp_path, tone_data, tiny_teacher):
    base = tiny_config(tone_data, tiny_teacher, tmp_path / "run")

    def key(**changes) -> str:
        raw = {k: dict(v) for k, v in base.items()}
        for dotted, value in changes.items():
            section, name = dotted.split("__")
            raw[section][name] = value
        cfg = config_from_dict(raw)
        return identity_key(teacher_identity(cfg, None, sampling_rate=cfg.data.sampling_rate, device_kind="cpu",
                                             features_on_device=False))

    reference = key()
    assert key() == reference  # stable
    assert key(teacher__dtype="bf16") != reference
    assert key(data__sampling_rate=8000) != reference
    assert key(data__max_seconds=0.5) != reference
    # A teacher whose weights changed (same folder name, same config) is another cache file.
    changed = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, changed)
    weights = load_file(changed / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, changed / "model.safetensors")
    assert key(teacher__model=str(changed)) != reference
    # A dataset whose audio changed has another fingerprint, so its rows are never served.
    data = tmp_path / "data"
    shutil.copytree(tone_data, data)
    cfg = config_from_dict(tiny_config(data, tiny_teacher, tmp_path / "run"))
    before = content_fingerprint(load_raw_splits(cfg.data)["train"], "audio")
    wav = sorted((data / "train").glob("*.wav"))[0]
    wav.write_bytes(wav.read_bytes()[:-64] + bytes(64))
    assert content_fingerprint(load_raw_splits(cfg.data)["train"], "audio") != before


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_cache_file_is_a_clear_error_naming_it(tmp_path, damage):
    cache = TeacherCache(tmp_path, {"teacher": "x"}, 3, ["a", "b", "c"])
    split = cache.register_split("train", "fp", 500)
    cache.put(split, range(500), torch.randn(500, 3))
    cache.close()
    data = cache.path.read_bytes()
    cache.path.write_bytes(data[: len(data) // 3] if damage == "truncate" else data[:100] + b"\x00garbage" * 500)
    for side in cache.path.parent.glob(cache.path.name + "-*"):
        side.unlink()  # the WAL / shared-memory files
    with pytest.raises(CacheError) as err:
        reopened = TeacherCache(tmp_path, {"teacher": "x"}, 3, ["a", "b", "c"])
        reopened.get(split, range(500))
    message = str(err.value)
    assert str(cache.path) in message and "--precompute-teacher" in message


def test_a_row_of_the_wrong_size_is_reported(tmp_path):
    cache = TeacherCache(tmp_path, {"teacher": "y"}, 4, list("abcd"))
    split = cache.register_split("train", "fp", 2)
    cache.put(split, [0, 1], torch.zeros(2, 4))
    with sqlite3.connect(cache.path) as db:
        db.execute("UPDATE logits SET data = x'0000' WHERE idx = 1")
    with pytest.raises(CacheError, match=r"row train:fp/1 holds 2 bytes, expected 16"):
        cache.get(split, [0, 1])


def test_round_trip_in_fp16_and_fp32(tmp_path):
    logits = torch.randn(6, 5) * 10
    for dtype, tol in (("fp32", 0.0), ("fp16", 1e-2)):
        cache = TeacherCache(tmp_path, {"teacher": "z"}, 5, list("abcde"), dtype=dtype)
        split = cache.register_split("test", "fp", 6)
        assert cache.put(split, range(6), logits) == 6
        assert cache.put(split, range(6), logits) == 0  # rows already there are kept
        back = torch.from_numpy(__import__("numpy").stack([cache.get(split, range(6))[i] for i in range(6)]))
        assert torch.allclose(back, logits, rtol=tol, atol=tol)
        assert cache.missing(split, 8) == [6, 7]


@pytest.mark.launches
def test_cache_with_augmentation(tmp_path, tone_data, tiny_teacher):
    with pytest.raises(ConfigError, match=r"distillation.teacher_cache.*augment.enabled"):
        config_from_dict(tiny_config(tone_data, tiny_teacher, tmp_path, distillation={"teacher_cache": "require"},
                                     augment={"enabled": True}))
    # auto: online KD with a note, never a cache of inputs that change every epoch.
    config = write_config(tmp_path / "aug.yaml", tiny_config(
        tone_data, tiny_teacher, tmp_path / "aug", augment={"enabled": True},
        distillation={"cache_dir": str(tmp_path / "cache")}))
    result = run_cli(["--config", str(config), "train.max_steps=2"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Teacher cache off: augment.enabled" in result.stdout
    assert not (tmp_path / "cache").exists()
    bad = run_cli(["--config", str(config), "--precompute-teacher"])
    assert bad.returncode == 2 and "augment.enabled" in bad.stderr and "Traceback" not in bad.stderr


def test_unquoted_off_in_yaml_means_off(tmp_path, tone_data, tiny_teacher):
    from kd.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(write_config(tmp_path / "x.yaml", tiny_config(tone_data, tiny_teacher, tmp_path)).read_text()
                    .replace("distillation:\n", "distillation:\n  teacher_cache: off\n"))
    assert load_config(path).distillation.teacher_cache == "off"


@pytest.mark.launches
def test_two_processes_fill_during_epoch_one_and_train_on_from_the_cache(tmp_path, tone_data, tiny_teacher):
    """Two CPU processes: each stores the rows of its own batches, the end of epoch 1 fills the rest
    (validation and test) without computing a sample twice, and epoch 2 matches online KD."""
    losses, bases = {}, {}
    for mode in ("off", "auto"):
        def attempt(n, mode=mode):  # each attempt its own run folder and cache; a hung launch is retried once
            base = tmp_path / f"{mode}-try{n}"
            base.mkdir()
            config = _config(base, tone_data, tiny_teacher, "ddp", teacher_cache=mode)
            return run_cli(["--config", str(config)], launcher=accelerate_launch(2),
                           env={"ACCELERATE_USE_CPU": "true"}, timeout=150)

        n, result = once_more_if_hung(attempt)
        assert result.returncode == 0, result.stderr[-3000:]
        bases[mode] = tmp_path / f"{mode}-try{n}"
        losses[mode] = _losses(bases[mode] / "ddp")
    assert len(losses["off"]) == 6  # 2 epochs of 3 steps (2 processes x batches of 4)
    assert losses["auto"] == pytest.approx(losses["off"], rel=1e-5, abs=1e-6)
    steps = [e for e in read_events(bases["auto"] / "ddp" / "telemetry.jsonl") if e["type"] == "step"]
    assert steps[-1]["cache"]["source"] == "cache"
    assert steps[-1]["cache"]["covered"] == {"train": [24, 24], "eval": [12, 12], "test": [12, 12]}
    with sqlite3.connect(next((bases["auto"] / "cache").glob("*.sqlite"))) as db:
        assert db.execute("SELECT COUNT(*) FROM logits").fetchone()[0] == 48


def test_top_k_rows_keep_the_top_probabilities_and_the_total_mass(tmp_path):
    """Large label spaces store the top k log-probabilities and the rest's mass: the decoded
    distribution has the teacher's top-k probabilities, sums to one, and is close in KL."""
    torch.manual_seed(0)
    logits = torch.randn(8, 1000) * 3
    cache = TeacherCache(tmp_path, {"teacher": "lm"}, 1000, [str(i) for i in range(1000)], dtype="fp32", top_k=32)
    assert cache.row_bytes == 32 * 4 + 33 * 4  # 260 bytes instead of 4000
    split = cache.register_split("train", "fp", 8)
    cache.put(split, range(8), logits)
    rows = cache.get(split, range(8))
    decoded = torch.from_numpy(__import__("numpy").stack([rows[i] for i in range(8)]))
    p, q = logits.softmax(-1), decoded.softmax(-1)
    assert torch.allclose(q.sum(-1), torch.ones(8), atol=1e-5)
    top = p.topk(32, dim=-1)
    assert torch.allclose(q.gather(1, top.indices), top.values, rtol=1e-4, atol=1e-7)
    kl = (p * (p.log() - q.log())).sum(-1)
    assert (kl >= -1e-6).all() and (kl < 0.5).all()
    # A cache whose k covers the whole label space stores plain logits (and is keyed as such).
    assert TeacherCache(tmp_path, {"teacher": "small"}, 10, list("abcdefghij"), top_k=32).top_k is None
