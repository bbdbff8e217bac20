"""Pre-flight memory estimate: arithmetic, scaling, teacher placement, advice, --preflight."""

from __future__ import annotations

import pytest
import torch

from kd.config import config_from_dict
from kd.preflight import CUDA_CONTEXT_BYTES, Estimate, advice, choose_teacher_device, estimate_memory
from kd.students import LogMelCNN
from kd.teachers.loading import load_teacher

from conftest import run_cli, tiny_config, write_config

CPU = torch.device("cpu")


def probe_batch(n: int = 2) -> dict:
    return {"waveform": torch.randn(n, 16000), "inputs": {"input_values": torch.randn(n, 16000)},
            "labels": torch.zeros(n, dtype=torch.long)}


def test_estimate_arithmetic(tiny_teacher):
    teacher = load_teacher(str(tiny_teacher), "audio")
    student = LogMelCNN(3, n_mels=16, channels=[8, 16])
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    est = estimate_memory(teacher, student, probe_batch(), "waveform", micro_batch=4, mixed_precision="no",
                          teacher_on_gpu=True, device=CPU)
    assert est.teacher_weights == 4 * n_teacher
    assert (est.student_weights, est.grads, est.optimizer) == (4 * n_student, 4 * n_student, 8 * n_student)
    assert est.cuda_context == CUDA_CONTEXT_BYTES and est.method == "analytic"
    assert 0 < est.teacher_activations < est.activations
    assert est.total == sum([est.teacher_weights, est.student_weights, est.grads, est.optimizer, est.activations,
                             est.cuda_context])
    half = load_teacher(str(tiny_teacher), "audio", dtype="bf16")
    halved = estimate_memory(half, student, probe_batch(), "waveform", micro_batch=4, mixed_precision="no",
                             teacher_on_gpu=True, device=CPU)
    assert halved.teacher_weights == 2 * n_teacher
    off = estimate_memory(teacher, student, probe_batch(), "waveform", micro_batch=4, mixed_precision="no",
                          teacher_on_gpu=False, device=CPU)
    assert off.teacher_weights == 0 and off.teacher_activations == 0


def test_activations_scale_with_the_micro_batch_and_precision():
    """Activations and the batch grow with the micro-batch; 16-bit autocast halves what autograd
    saves, not the fp32 batch the step holds on the device."""
    from kd.preflight import batch_bytes

    student = LogMelCNN(3, n_mels=16, channels=[8, 16])
    small = estimate_memory(None, student, probe_batch(), "waveform", micro_batch=4, mixed_precision="no",
                            teacher_on_gpu=False, device=CPU).activations
    large = estimate_memory(None, student, probe_batch(), "waveform", micro_batch=8, mixed_precision="no",
                            teacher_on_gpu=False, device=CPU).activations
    mixed = estimate_memory(None, student, probe_batch(), "waveform", micro_batch=8, mixed_precision="bf16",
                            teacher_on_gpu=False, device=CPU).activations
    batch = batch_bytes(probe_batch()) * 8 // 2  # waveform, processed inputs and labels: 2 rows scaled to 8
    assert batch == 8 * (16000 * 4 * 2 + 8)
    assert large == pytest.approx(2 * small, rel=0.01)
    assert mixed == pytest.approx((large - batch) / 2 + batch, rel=0.01)


@pytest.mark.parametrize("model", ["logmel", "wav2vec2"])
def test_probe_leaves_no_trace(tmp_path, model):
    """No weights, buffers, gradients or random state change: training is the same with or without it."""
    import random

    import numpy as np

    from kd.synthetic import TONE_LABELS, save_tiny_wav2vec2

    torch.manual_seed(0)
    if model == "logmel":
        student, key = LogMelCNN(3, n_mels=16, channels=[8, 16]), "waveform"
    else:  # wav2vec2 draws its time masks from NumPy's global generator
        folder = save_tiny_wav2vec2(tmp_path / "w2v", TONE_LABELS, mask_time_prob=0.5, mask_time_length=2)
        student, key = load_teacher(str(folder), "audio").requires_grad_(True), "inputs"
    before = {k: v.clone() for k, v in student.state_dict().items()}
    batch = probe_batch()
    torch_rng, numpy_rng, python_rng = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    estimate_memory(None, student, batch, key, micro_batch=4, mixed_precision="no", teacher_on_gpu=False, device=CPU)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert torch.equal(torch_rng, torch.get_rng_state()) and all(p.grad is None for p in student.parameters())
    assert (np.random.get_state()[1] == numpy_rng).all() and random.getstate() == python_rng


def make_estimate(teacher_weights: int, teacher_act: int, rest: int) -> Estimate:
    parts = dict(teacher_weights=teacher_weights, student_weights=rest, grads=0, optimizer=0,
                 activations=teacher_act, cuda_context=0)
    return Estimate(**parts, total=sum(parts.values()), teacher_activations=teacher_act, method="analytic")


def test_teacher_placement():
    assert choose_teacher_device(make_estimate(2, 1, 3), budget=10)[0] == "gpu"
    where, why = choose_teacher_device(make_estimate(6, 2, 3), budget=10)
    assert where == "cpu" and "over the" in why
    assert choose_teacher_device(make_estimate(6, 2, 30), budget=10)[0] == "gpu"  # CPU would not fit either


def test_advice_is_ranked_by_saving(tiny_teacher):
    cfg = config_from_dict({"data": {"dataset": "x", "modality": "audio"}, "teacher": {"model": "t"},
                            "train": {"batch_size": 64}})
    est = make_estimate(4_000_000_000, 1_000_000_000, 500_000_000)
    items = advice(est, cfg, budget=1_000_000_000, student=LogMelCNN(3))
    savings = [s for _, s in items]
    assert savings == sorted(savings, reverse=True)
    assert items[0][0].startswith("teacher.device: cpu") and items[0][1] == 5_000_000_000
    texts = " | ".join(t for t, _ in items)
    assert "teacher.dtype: bf16" in texts and "train.batch_size: 32 with train.grad_accum: 2" in texts
    assert "data.max_seconds: 0.5" in texts



def test_advice_says_when_only_a_bigger_budget_or_student_can_fit():
    """The CUDA context and the student's weights, gradients and AdamW state do not shrink with the
    batch, precision or teacher: under a budget below them, the advice says so instead of listing
    changes that cannot help."""
    cfg = config_from_dict({"data": {"dataset": "x"}, "teacher": {"model": "t"}, "train": {"batch_size": 64}})
    parts = dict(teacher_weights=300_000_000, student_weights=100_000_000, grads=100_000_000, optimizer=200_000_000,
                 activations=900_000_000, cuda_context=500_000_000)
    est = Estimate(**parts, total=sum(parts.values()), teacher_activations=200_000_000, method="analytic")
    [(text, short)] = advice(est, cfg, budget=800_000_000, student=LogMelCNN(3))
    assert text.startswith("memory.vram_budget_gb: 0.90 at least, or a smaller student") and "0.90 GB" in text
    assert short == 100_000_000
    # One byte more budget than that fixed part: the ordinary advice again.
    texts = [t for t, _ in advice(est, cfg, budget=900_000_001, student=LogMelCNN(3))]
    assert texts[0].startswith("teacher.device: cpu") and not any("vram_budget_gb" in t for t in texts)

@pytest.mark.launches
def test_preflight_flag_prints_and_writes_nothing(tmp_path, tone_data, tiny_teacher):
    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run", memory={"vram_budget_gb": 0.1})
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg)), "--preflight"])
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "Pre-flight memory estimate" in out and "OVER BUDGET" in out and "vs budget 0.10 GB" in out
    assert "Over the budget by " in out and "What would help" in out and "Pre-flight only" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.launches
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks planning a GPU config on a machine without one")
def test_preflight_plans_a_gpu_config_without_a_gpu(tmp_path, tone_data, tiny_teacher):
    """configs/5gb.yaml's settings (fp16, the teacher on CUDA, GPU only) planned on a CPU: the
    estimate, counted for 16-bit activations, instead of "fp16 needs a CUDA GPU"."""
    def preflight(precision: str, extra: list[str]) -> str:
        # A student whose step outweighs the tiny teacher's forward, so its activations decide.
        cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run", train={"mixed_precision": precision},
                          student={"channels": [64, 64], "n_mels": 40})
        result = run_cli(["--config", str(write_config(tmp_path / f"{precision}.yaml", cfg)), "--preflight", *extra])
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    gpu = preflight("fp16", ["teacher.device=cuda", "run.gpu_only=true"])
    assert "Planning for a CUDA GPU on a machine without one (run.gpu_only: true, train.mixed_precision: fp16, " \
           "teacher.device: cuda)" in gpu
    assert "Pre-flight memory estimate" in gpu and "activations (analytic)" in gpu and "Pre-flight only" in gpu
    plain = preflight("no", [])
    assert "Planning for a CUDA GPU" not in plain

    def activations(out: str) -> float:
        line = next(line for line in out.splitlines() if "activations (analytic)" in line)
        value, unit = line.split()[-2:]
        return float(value) * {"KB": 1e3, "MB": 1e6, "GB": 1e9}.get(unit, 1)

    assert activations(gpu) < activations(plain)  # 16-bit activations counted for the GPU it targets
    # Training (no --preflight) still refuses the GPU-only setting here, in one line.
    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run", train={"mixed_precision": "fp16"})
    result = run_cli(["--config", str(write_config(tmp_path / "train.yaml", cfg))])
    assert result.returncode == 2 and "'fp16' needs a CUDA GPU" in result.stderr


def test_flagship_architecture_fits_the_budget_analytically():
    """configs/5gb.yaml's teacher (AST for Speech Commands v2) from its config, random weights."""
    from transformers import ASTConfig, ASTForAudioClassification

    teacher = ASTForAudioClassification(ASTConfig(max_length=128, num_mel_bins=128, num_labels=35))
    teacher = teacher.to(torch.float16).eval().requires_grad_(False)
    student = LogMelCNN(35, 16000, 40, [64, 128, 128, 256])
    batch = {"waveform": torch.randn(2, 16000), "inputs": {"input_values": torch.randn(2, 128, 128)},
             "labels": torch.zeros(2, dtype=torch.long)}
    est = estimate_memory(teacher, student, batch, "waveform", micro_batch=128, mixed_precision="fp16",
                          teacher_on_gpu=True, device=CPU)
    assert 80e6 < sum(p.numel() for p in teacher.parameters()) < 90e6
    assert est.teacher_weights == pytest.approx(0.17e9, rel=0.05)
    assert est.total < 5.5e9


def test_largest_fitting_micro_batch_keeps_the_effective_batch():
    from kd.preflight import largest_fitting_micro_batch

    tried = []

    def fits(micro):
        tried.append(micro)
        return micro <= 5

    assert largest_fitting_micro_batch(12, fits) == 4 and tried == [12, 6, 4]  # divisors only, largest first
    assert largest_fitting_micro_batch(8, lambda m: False) == 0


@pytest.mark.launches
def test_auto_batch_size_picks_what_fits_and_records_it(tmp_path, tone_data, tiny_teacher):
    from kd.telemetry import read_events

    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run", memory={"auto_batch_size": True},
                      train={"batch_size": 2, "grad_accum": 2, "max_steps": 2, "eval_every": 100})
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Auto batch size: micro-batch 4 x accumulation 1 (effective batch 4)" in result.stdout
    events = read_events(tmp_path / "run")
    plan = events[0]["plan"]
    assert (plan["micro_batch"], plan["grad_accum"], plan["effective_batch"]) == (4, 1, 4)
    assert [e["samples"] for e in events if e["type"] == "step"] == [4, 8]  # Accelerate accumulates 1, not 2


def test_choose_batch_size_shrinks_to_the_budget_and_treats_oom_as_no_fit():
    from kd.build import choose_batch_size

    cfg = config_from_dict({"data": {"dataset": "x"}, "teacher": {"model": "t"},
                            "train": {"batch_size": 8, "grad_accum": 1}})

    def probe(micro):
        if micro == 8:
            raise torch.OutOfMemoryError("probe step did not fit")
        return make_estimate(0, 10 * micro, 100)

    said = []
    choose_batch_size(cfg, probe, budget=145, say=said.append)
    assert (cfg.train.batch_size, cfg.train.grad_accum) == (4, 2) and "micro-batch 4 x accumulation 2" in said[0]
    choose_batch_size(cfg, lambda m: make_estimate(0, 10 * m, 1000), budget=145, say=said.append)
    assert (cfg.train.batch_size, cfg.train.grad_accum) == (4, 2) and "not even a micro-batch of 1" in said[1]



@pytest.mark.parametrize("helps", [True, False])
def test_a_run_started_over_its_budget_says_so_in_telemetry(tmp_path, tone_data, tiny_teacher, monkeypatch, helps):
    """On the CPU nothing caps the run, so it trains; the warning tells the monitor what the
    pre-flight estimate said (here: the CUDA context alone is over a 0.1 GB budget), advice or not."""
    import kd.build
    from kd.build import build_run
    from kd.telemetry import read_events
    from kd.trainer import Trainer

    if not helps:
        monkeypatch.setattr(kd.build, "advice", lambda *args: [])
    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run", memory={"vram_budget_gb": 0.1},
                      train={"max_steps": 1, "eval_every": 100})
    Trainer(build_run(config_from_dict(cfg))).fit()
    [warning] = [e for e in read_events(tmp_path / "run") if e["type"] == "warning" and e["code"] == "over_budget"]
    expected = "memory.vram_budget_gb: 0.5" if helps else "no config change is estimated to help"
    assert warning["message"].startswith("estimated 0.") and f"over the 0.1 GB budget; {expected}" in warning["message"]
