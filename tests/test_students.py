"""Pretrained students (student.model) and LoRA students (student.lora, PEFT): what loads, what
trains, what resumes and what is exported. In-process runs of a few steps on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd.build import build_run
from kd.config import config_from_dict
from kd.errors import ConfigError, ModelLoadError
from kd.synthetic import save_tiny_bert, save_tiny_llama, write_lm_dataset, write_sentiment_csv
from kd.telemetry import read_events
from kd.trainer import Trainer


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer teacher and a 2-layer 'pretrained' student sharing the tiny tokenizer, and LM data."""
    tmp = tmp_path_factory.mktemp("llamas")
    return {"teacher": save_tiny_llama(tmp / "teacher"), "student": save_tiny_llama(tmp / "student", seed=1, layers=2),
            "data": write_lm_dataset(tmp / "data", "text", {"train": 16, "validation": 4})}


def lm_config(llamas: dict[str, Path], out: Path, **sections) -> dict:
    cfg = {
        "run": {"name": "lora-lm", "output_dir": str(out), "seed": 0},
        "data": {"dataset": "json", "data_dir": str(llamas["data"]), "modality": "causal_lm", "input_column": "text",
                 "eval_split": "validation", "max_length": 32, "num_workers": 0},
        "teacher": {"model": str(llamas["teacher"])},
        "student": {"type": "hf", "model": str(llamas["student"]), "lora": {"rank": 4, "alpha": 8, "dropout": 0.1}},
        "distillation": {"alpha": 0.5, "temperature": 2.0, "cache_dir": str(out / "cache")},
        "train": {"batch_size": 4, "epochs": None, "max_steps": 4, "lr": 0.01, "eval_every": 100},
        "telemetry": {"log_every": 1, "warmup_steps": 0},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def train(cfg: dict, resume_from: Path | None = None) -> Trainer:
    trainer = Trainer(build_run(config_from_dict(cfg)))
    trainer.fit(resume_from=resume_from)
    return trainer


def step_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"]["total"] for e in read_events(run_dir / "telemetry.jsonl") if e["type"] == "step"}


@pytest.mark.parametrize("student,fragment", [
    ({"model": "m", "config": "c"}, "student.model: a pretrained student takes its architecture and weights from m; "
                                    "remove student.config"),
    ({"model": "m", "init_from_teacher": True}, "remove student.init_from_teacher"),
    ({"model": "m", "config_overrides": {"num_hidden_layers": 1}}, "remove student.config_overrides"),
    ({"revision": "main"}, "student.revision: 'main' is not allowed; only used with student.model"),
    ({"type": "logmel_cnn", "lora": {}}, "student.lora: LoRA adapts a pretrained transformers student"),
    ({"config": "c", "lora": {}}, "student.lora: a student built from a config starts from random weights"),
    ({"model": "m", "lora": {"rank": 0}}, "student.lora.rank: 0 is not allowed; must be an integer >= 1"),
    ({"model": "m", "lora": {"alpha": -1}}, "student.lora.alpha: -1.0 is not allowed"),
    ({"model": "m", "lora": {"dropout": 1.0}}, "student.lora.dropout: 1.0 is not allowed; must be in [0, 1)"),
    ({"model": "m", "lora": {"target_modules": []}}, "student.lora.target_modules: [] is not allowed"),
    ({"model": "m", "lora": {"rnak": 8}}, "student.lora.rnak: unknown key; did you mean student.lora.rank?"),
    ({"type": "logmel_cnn", "gradient_checkpointing": True}, "student.gradient_checkpointing: True is not allowed"),
])
def test_pretrained_and_lora_student_config_errors(student, fragment):
    raw = {"data": {"dataset": "json", "modality": "text"}, "teacher": {"model": "t"},
           "student": {"type": "hf", **student}}
    if student.get("type") == "logmel_cnn":
        raw["data"]["modality"] = "audio"
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert any(fragment in p for p in err.value.problems), err.value.problems


def test_a_lora_language_model_student_trains_only_its_adapters_and_exports_merged(tmp_path, llamas):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = train(lm_config(llamas, tmp_path / "run", train={"checkpoint_every": 4}))
    adapters = list(trainer.optimizer.optimizer.state)
    assert adapters and all(p.numel() <= 4 * 32 for p in adapters)  # AdamW state for the rank-4 adapters alone
    # After 4 steps every pretrained weight is bit-identical to the file's; the adapters moved from zero.
    original = load_file(str(llamas["student"] / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000004" / "model.safetensors"))
    frozen = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in after.items() if "lora_" not in k}
    assert set(original) <= set(frozen) and all(torch.equal(frozen[k], original[k]) for k in original)
    assert all(v.abs().max() > 0 for k, v in after.items() if "lora_B" in k)
    student = tmp_path / "run" / "student"
    assert (student / "adapter" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(llamas["student"])
    with_adapter = PeftModel.from_pretrained(base, student / "adapter").eval()
    # The merged export: plain weights any transformers user loads, computing what the adapter model does.
    merged = AutoModelForCausalLM.from_pretrained(student).eval()
    ids = torch.randint(3, 290, (2, 12))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits, atol=1e-5)
    assert not any("lora" in k for k in load_file(str(student / "model.safetensors")))


def test_a_lora_student_resumes_with_the_same_losses(tmp_path, llamas):
    common = {"train": {"max_steps": 6, "checkpoint_every": 3, "keep_checkpoints": 5, "lr": 0.01}}
    train(lm_config(llamas, tmp_path / "full", **common))
    checkpoint = tmp_path / "full" / "checkpoints" / "step_0000003"
    assert checkpoint.is_dir()
    train(lm_config(llamas, tmp_path / "part", **common), resume_from=checkpoint)
    full, resumed = step_losses(tmp_path / "full"), step_losses(tmp_path / "part")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step


def test_a_pretrained_language_model_student_trains_in_full_with_gradient_checkpointing(tmp_path, llamas):
    cfg = lm_config(llamas, tmp_path / "run", student={"lora": None, "gradient_checkpointing": True})
    trainer = train(cfg)
    assert trainer.run.student.is_gradient_checkpointing
    original = load_file(str(llamas["student"] / "model.safetensors"))
    exported = load_file(str(tmp_path / "run" / "student" / "model.safetensors"))
    assert all(not torch.equal(exported[k], original[k]) for k in original if "layers.0.self_attn" in k)
    assert not (tmp_path / "run" / "student" / "adapter").exists()
    losses = step_losses(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3, 4] and all(v > 0 for v in losses.values())


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sentiment")
    return {"data": write_sentiment_csv(tmp / "data"), "teacher": save_tiny_bert(tmp / "teacher", ["neg", "pos"]),
            "student": save_tiny_bert(tmp / "student", ["neg", "pos"], seed=1),
            "other": save_tiny_bert(tmp / "other", ["sports", "weather"], seed=2)}


def text_config(sentiment: dict[str, Path], out: Path, which: str, **sections) -> dict:
    cfg = {
        "run": {"name": "text-student", "output_dir": str(out), "seed": 0},
        "data": {"dataset": "csv", "data_dir": str(sentiment["data"]), "modality": "text", "num_workers": 0,
                 "eval_split": "validation", "max_length": 16},
        "teacher": {"model": str(sentiment["teacher"])},
        "student": {"type": "hf", "model": str(sentiment[which])},
        "distillation": {"cache_dir": str(out / "cache")},
        "train": {"batch_size": 4, "epochs": None, "max_steps": 3, "lr": 0.01, "eval_every": 100},
        "telemetry": {"log_every": 1, "warmup_steps": 0},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def test_a_pretrained_classifier_keeps_its_head_when_it_names_the_data_labels(tmp_path, sentiment, capsys):
    from transformers import AutoModelForSequenceClassification

    run = build_run(config_from_dict(text_config(sentiment, tmp_path / "run", "student")))
    saved = AutoModelForSequenceClassification.from_pretrained(sentiment["student"])
    assert all(torch.equal(a, b) for a, b in zip(run.student.state_dict().values(), saved.state_dict().values()))
    assert "new head" not in capsys.readouterr().out


def test_a_pretrained_classifier_for_other_labels_gets_a_new_head_and_lora_trains_it(tmp_path, sentiment, capsys):
    cfg = text_config(sentiment, tmp_path / "run", "other", student={"lora": {"rank": 2}})
    run = build_run(config_from_dict(cfg))
    trainable = {n for n, p in run.student.named_parameters() if p.requires_grad}
    Trainer(run).fit()
    out = capsys.readouterr().out
    assert ("student.model: " + str(sentiment["other"]) + "'s head predicted sports, weather; a new head for the "
            "data's 2 labels starts from random weights") in out
    assert "LoRA: rank 2, alpha 32 on query, value, classifier trained fully" in out
    assert any("lora_A" in n for n in trainable) and all("lora_" in n or "classifier" in n for n in trainable)
    from transformers import AutoModelForSequenceClassification

    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "student")
    assert exported.config.id2label == {0: "neg", 1: "pos"}
    assert read_events(tmp_path / "run" / "telemetry.jsonl")[-1]["status"] == "completed"


def test_a_log_mel_cnn_the_kit_exported_continues_as_a_student(tmp_path, tone_data, capsys):
    from kd.audio.logmel_cnn import LogMelCNN
    from kd.export.student import save_student
    from kd.synthetic import TONE_LABELS

    from conftest import tiny_config

    torch.manual_seed(3)
    exported = save_student(LogMelCNN(len(TONE_LABELS), sample_rate=8000, n_mels=16, channels=[8, 16]),
                            tmp_path / "exported", list(TONE_LABELS))
    cfg = tiny_config(tone_data, None, tmp_path / "run", student={"model": str(exported)})
    run = build_run(config_from_dict(cfg))
    saved = load_file(str(exported / "model.safetensors"))
    assert all(torch.equal(run.student.state_dict()[k], v) for k, v in saved.items())
    assert "new head" not in capsys.readouterr().out
    relabelled = save_student(LogMelCNN(2, sample_rate=8000, n_mels=16, channels=[8, 16]), tmp_path / "other",
                              ["yes", "no"])
    run = build_run(config_from_dict(tiny_config(tone_data, None, tmp_path / "run2",
                                                 student={"model": str(relabelled)})))
    assert f"a new head for the data's {len(TONE_LABELS)} labels" in capsys.readouterr().out
    assert run.student(torch.zeros(2, 8000)).shape == (2, len(TONE_LABELS))
    with pytest.raises(ModelLoadError, match="is a log-mel CNN this kit exported; set student.type: logmel_cnn"):
        build_run(config_from_dict(tiny_config(tone_data, None, tmp_path / "run3", student={
            "type": "hf", "model": str(exported)})))


def test_a_student_model_with_pickles_only_is_refused(tmp_path, sentiment):
    cfg = text_config(sentiment, tmp_path / "run", "student")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((sentiment["student"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    cfg["student"] = {"type": "hf", "model": str(pickled)}
    with pytest.raises(ModelLoadError, match=r"student.model: .*pickled holds only pickle weights"):
        build_run(config_from_dict(cfg))


@pytest.mark.parametrize("modality", ["audio", "image"])
def test_lora_adapts_audio_and_image_transformer_students_and_trains_their_heads(tmp_path, tone_data, tiny_teacher,
                                                                                 modality, capsys):
    """The audio (wav2vec2) and image (ViT) classifiers as pretrained LoRA students, CE only: the
    attention's query/value projections get adapters by their names, the head trains fully."""
    from kd.synthetic import save_tiny_vit, write_color_images

    from conftest import tiny_config

    if modality == "audio":
        cfg = tiny_config(tone_data, None, tmp_path / "run", student={
            "type": "hf", "model": str(tiny_teacher), "lora": {"rank": 2}}, train={"max_steps": 2})
        targets = "q_proj, v_proj"
    else:
        images = write_color_images(tmp_path / "images")
        vit = save_tiny_vit(tmp_path / "vit", ["blue", "red"])
        cfg = tiny_config(images, None, tmp_path / "run", data={"dataset": "imagefolder", "test_split": None},
                          student={"type": "hf", "model": str(vit), "lora": {"rank": 2}}, train={"max_steps": 2})
        targets = "q_proj, v_proj"  # transformers 5's ViT names them as Llama does
    run = build_run(config_from_dict(cfg))
    assert f"LoRA: rank 2, alpha 32 on {targets}" in capsys.readouterr().out
    trainable = {n for n, p in run.student.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    assert all("lora_" in n or "classifier" in n or "projector" in n for n in trainable)
    Trainer(run).fit()  # the export merges the adapters into the live model: checked above, before it
    assert (tmp_path / "run" / "student" / "adapter" / "adapter_config.json").is_file()
