"""Planning a language-model pair from its config.json files alone (kd/lm/planner.py), against hand
arithmetic on the published Qwen2.5 configs (tests/fixtures/qwen2.5: their config.json, verbatim)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd.config import config_from_dict
from kd.lm.planner import plan_from_configs
from kd.preflight import format_estimate
from kd.synthetic import write_lm_dataset

from conftest import run_cli, write_config

QWEN = Path(__file__).parent / "fixtures" / "qwen2.5"
GB = 1e9


def qwen_parameters(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                    tied: bool) -> int:
    """Qwen2 by hand: embeddings (and an untied head), per layer q/k/v with biases, o, the gated MLP
    and two RMSNorms, then the final norm."""
    kv = kv_heads * hidden // heads
    layer = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden + 3 * hidden * intermediate \
        + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * layer + hidden


HAND = {
    "7B": qwen_parameters(3584, 18944, 28, 28, 4, 152064, tied=False),  # 7.62B
    "1.5B": qwen_parameters(1536, 8960, 28, 12, 2, 151936, tied=True),  # 1.54B
    "0.5B": qwen_parameters(896, 4864, 24, 14, 2, 151936, tied=True),  # 0.49B
}


def pair(big: str, small: str, folder: Path, **sections) -> dict:
    """A Qwen2.5 pair: the `big` one teaches the `small` one (sizes as in their names)."""
    cfg = {"data": {"dataset": "json", "data_dir": str(folder), "modality": "causal_lm", "input_column": "text",
                    "max_length": 1024},
           "teacher": {"model": str(QWEN / f"Qwen2.5-{big}-Instruct"), "dtype": "bf16"},
           "student": {"type": "hf", "model": str(QWEN / f"Qwen2.5-{small}-Instruct")},
           "train": {"batch_size": 1, "mixed_precision": "bf16", "epochs": 1}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_lm_dataset(tmp_path_factory.mktemp("lm") / "data", "text", {"train": 4})


def test_parameter_counts_match_the_published_sizes():
    assert HAND["7B"] == pytest.approx(7.62e9, rel=0.01)  # the model card: 7.61B
    assert HAND["1.5B"] == pytest.approx(1.54e9, rel=0.01)  # 1.54B
    assert HAND["0.5B"] == pytest.approx(0.49e9, rel=0.01)  # 0.49B


@pytest.mark.parametrize("teacher", ["7B", "1.5B"])
def test_full_fine_tuning_plan_is_within_ten_percent_of_the_hand_calculation(data, teacher):
    plan = plan_from_configs(config_from_dict(pair(teacher, "0.5B", data)))
    est, n = plan.estimate, HAND["0.5B"]
    assert plan.student_parameters == n and plan.teacher_parameters == HAND[teacher]
    assert est.student_weights == pytest.approx(4 * n, rel=0.1)  # fp32 weights
    assert est.grads == pytest.approx(4 * n, rel=0.1) and est.optimizer == pytest.approx(8 * n, rel=0.1)
    # 16 B per parameter: 7.9 GB before activations, more than a 5.5 GB card whatever the teacher.
    floor = est.student_weights + est.grads + est.optimizer
    assert floor == pytest.approx(16 * n, rel=0.1) and floor > 5.5 * GB
    # Activations by hand: per token, 24 layers x (7 x 896 + 2 x 128 + 4 x 4864) bf16 values, plus two hidden.
    tokens = 1024
    activations = tokens * (24 * (7 * 896 + 2 * 128 + 4 * 4864) + 2 * 896) * 2
    teacher_extra = max(0, 3 * tokens * max(2 * {"7B": 18944, "1.5B": 8960}[teacher], 152064 if teacher == "7B"
                                            else 151936) * 2 - activations)
    assert est.activations == pytest.approx(activations + (teacher_extra if plan.teacher_where == "gpu" else 0),
                                            rel=0.1)
    # Logits: the student's fp32 logits and gradient and the teacher's, plus the loss's six chunk-wide tensors.
    logits = tokens * 151936 * 4 * 3 + 6 * 256 * 151936 * 4  # memory.loss_chunk: 256 positions (its default)
    assert est.logits == pytest.approx(logits, rel=0.1)
    teacher_bytes = 2 * HAND[teacher] if plan.teacher_where == "gpu" else 0
    assert est.teacher_weights == pytest.approx(teacher_bytes, rel=0.1)
    assert est.total == pytest.approx(sum((est.student_weights, est.grads, est.optimizer, est.activations,
                                           est.logits, est.teacher_weights, est.cuda_context)), rel=1e-9)


def test_lora_trains_a_few_million_parameters_and_fits_with_the_teacher_off_the_gpu(data):
    cfg = pair("7B", "0.5B", data, student={"lora": {"rank": 16}, "gradient_checkpointing": True},
               teacher={"device": "cpu"}, data={"max_length": 512})
    plan = plan_from_configs(config_from_dict(cfg))
    lora = 24 * (16 * (896 + 896) + 16 * (896 + 128))  # rank 16 on q_proj and v_proj (PEFT's Qwen2 default)
    assert plan.trainable == lora == 1_081_344
    assert plan.estimate.grads == 4 * lora and plan.estimate.optimizer == 8 * lora
    assert plan.estimate.teacher_weights == 0 and plan.teacher_where == "cpu"
    assert plan.estimate.total < 5.5 * GB


def test_on_policy_sampling_is_planned_apart_from_the_training_step(data):
    """The KV cache of sampling by hand (2 x 24 layers x 128 key/value width x 1024 positions x 2 B for
    Qwen2.5-0.5B in bf16) is counted; it lives while the student samples, not with the step's
    activations, so the total is the larger of the two moments."""
    base = pair("7B", "0.5B", data, student={"lora": {"rank": 16}}, teacher={"device": "cpu"})
    plain = plan_from_configs(config_from_dict(base)).estimate
    sampled = plan_from_configs(config_from_dict({**base, "distillation": {"on_policy": {"share": 0.5}}})).estimate
    cache = 2 * 24 * 128 * 1024 * 2
    assert plain.generation == 0 and cache < sampled.generation < cache + 3 * 1024 * 4864 * 2 + 2 * 151936 * 4 + 1
    assert sampled.total == max(plain.total, plain.total - plain.activations - plain.logits + sampled.generation)
    # The step's logits (1024 x 151936 x 4 B, x3) outweigh sampling's cache: the step stays the peak.
    assert sampled.total == plain.total and "sampling (on-policy, apart)" in format_estimate(sampled, int(5.5 * GB))


def test_a_cached_or_remote_teacher_is_not_in_memory(data):
    cached = plan_from_configs(config_from_dict(pair("7B", "0.5B", data, distillation={
        "teacher_cache": "require", "cache_top_k": 64})))
    assert cached.teacher_where == "cache" and cached.estimate.teacher_weights == 0
    remote = pair("7B", "0.5B", data, teacher={"endpoint": {"url": "http://127.0.0.1:9/v1", "model": "qwen"}})
    plan = plan_from_configs(config_from_dict(remote))
    assert plan.teacher_where == "remote" and plan.estimate.teacher_weights == 0


def test_the_shipped_qwen_lora_config_fits_the_budget_it_states(data):
    from kd.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "qwen2.5_7b_to_0.5b_lora.yaml", [
        f"teacher.model={QWEN / 'Qwen2.5-7B-Instruct'}", f"student.model={QWEN / 'Qwen2.5-0.5B-Instruct'}"])
    plan = plan_from_configs(cfg)
    assert plan.teacher_where == "cpu" and plan.trainable == 1_081_344
    assert plan.estimate.total <= cfg.memory.vram_budget_gb * GB
    assert f"planned: {plan.estimate.total / GB:.1f} GB" in (Path(__file__).parents[1] / "configs" /
                                                             "qwen2.5_7b_to_0.5b_lora.yaml").read_text()


@pytest.mark.launches
def test_preflight_of_a_language_model_pair_plans_from_configs_and_advises(tmp_path, data):
    config = write_config(tmp_path / "pair.yaml", pair("7B", "0.5B", data, run={"output_dir": str(tmp_path / "run")}))
    result = run_cli(["--config", str(config), "--preflight"], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "Planned from the models' config.json files alone" in out
    assert "0.494B parameters, every weight trains" in out and "7.62B parameters, on the GPU" in out
    assert "OVER BUDGET" in out and "activations (from configs)" in out
    for advice in ("student.lora: {rank: 16}", "teacher.device: cpu", "distillation.teacher_cache: require",
                   "teacher.endpoint", "data.max_length: 512", "student.gradient_checkpointing: true",
                   "memory.loss_chunk: 64"):
        assert advice in out, advice
    assert not (tmp_path / "run").exists()
    fits = run_cli(["--config", str(config), "--preflight", "student.lora.rank=16", "teacher.device=cpu",
                    "student.gradient_checkpointing=true", "data.max_length=512"], timeout=120)
    assert fits.returncode == 0 and ": fits" in fits.stdout and "LoRA rank 16: 1.08M trainable" in fits.stdout
