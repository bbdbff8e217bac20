"""Student builders.

- `student.model`: a pretrained student (a Hub id, a model folder, or a student folder this kit
  exported), loaded from safetensors with the Auto class of the data's task; a classifier whose
  labels differ from the data's gets a new head. `student.lora` then trains adapters on it
  (kd/lora.py), `student.gradient_checkpointing` recomputes its activations in backward.
- `logmel_cnn`: a small keyword-spotting CNN that turns raw audio into log-mel features inside its
  forward pass (torchaudio on the model's device), so the data path carries only waveforms
  (kd/audio/logmel_cnn.py).
- `hf`: any transformers classification model or causal LM built from a config (a folder, a Hub id,
  or the teacher's own config with overrides such as fewer layers), trained from scratch or
  initialised from a subset of the teacher's layers, as DistilBERT was.
"""

from __future__ import annotations

import difflib
import logging
import re
from typing import Any

import torch
from torch import nn

from kd.audio.logmel_cnn import LogMelCNN
from kd.config import StudentConfig
from kd.errors import ModelLoadError
from kd.lora import add_lora, head_modules
from kd.teachers.loading import (
    TASK_CLASSES,
    is_kit_model,
    label_space,
    load_model_config,
    load_pretrained,
    model_label_names,
)

log = logging.getLogger(__name__)


def build_student(cfg: StudentConfig, modality: str, label_names: list[str], sample_rate: int | None,
                  *, teacher: nn.Module | None = None, teacher_spec: str | None = None, say=print) -> nn.Module:
    if cfg.model is not None:
        model = load_pretrained_student(cfg, modality, label_names, sample_rate, say)
    elif cfg.type == "logmel_cnn":
        model = LogMelCNN(len(label_names), sample_rate=sample_rate or 16000, n_mels=cfg.n_mels,
                          channels=cfg.channels, dropout=cfg.dropout, normalize=cfg.normalize,
                          pool=cfg.pool, stem_stride=cfg.stem_stride)
    else:
        model = build_hf_student(cfg, modality, label_names, teacher=teacher, teacher_spec=teacher_spec)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach LoRA adapters even though the frozen inputs
        # of each layer need none (the reentrant kind would silently give them no gradient).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        model, note = add_lora(model, cfg.lora, classifier=modality != "causal_lm")
        say(note)
    return model


def load_pretrained_student(cfg: StudentConfig, modality: str, label_names: list[str], sample_rate: int | None,
                            say=print) -> nn.Module:
    """student.model: pretrained weights (safetensors only, checked as a teacher's are). A classifier
    keeps its head where it predicts the data's labels in the data's order; else the head starts
    again from random weights for the data's labels (said in one line)."""
    spec = cfg.model
    kit = is_kit_model(spec)
    if kit != (cfg.type == "logmel_cnn"):
        what = "a log-mel CNN this kit exported" if kit else "a transformers model"
        raise ModelLoadError(f"student.model: {spec} is {what}; set student.type: {'logmel_cnn' if kit else 'hf'}")
    if kit:
        model = load_pretrained(spec, "audio", what="student.model")
        if sample_rate and model.sample_rate != sample_rate:
            raise ModelLoadError(f"student.model: {spec} was trained on {model.sample_rate} Hz audio but the data is "
                                 f"read at {sample_rate} Hz; set data.sampling_rate: {model.sample_rate}")
        if not _same_labels(model_label_names(model)[1], label_names):
            say(_new_head_note(spec, model_label_names(model)[1], label_names))
            linear = model.head[-1]
            model.head[-1] = nn.Linear(linear.in_features, len(label_names))
            model.config["num_labels"] = len(label_names)
        model.label_names = list(label_names)
        return model
    if modality == "causal_lm":
        return load_pretrained(spec, modality, cfg.revision, what="student.model")
    config = load_model_config(spec, "student.model", cfg.revision)
    n_old, old = label_space(config)
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    model = load_pretrained(spec, modality, cfg.revision, what="student.model", config=config)
    if old is not None and not _same_labels(old, label_names):
        # Same number of labels but other names (or order): transformers kept the old head's weights,
        # which would mean other classes. Different numbers: it started a new head already.
        say(_new_head_note(spec, old, label_names))
        if n_old == len(label_names):
            for name in head_modules(model):
                for module in getattr(model, name).modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
    return model


def _same_labels(names: list[str] | None, label_names: list[str]) -> bool:
    return names is not None and [n.lower() for n in names] == [n.lower() for n in label_names]


def _new_head_note(spec: str, old: list[str] | None, label_names: list[str]) -> str:
    was = f"predicted {', '.join(old[:6])}{' ...' if len(old) > 6 else ''}" if old else "had unnamed labels"
    return (f"student.model: {spec}'s head {was}; a new head for the data's {len(label_names)} labels starts from "
            "random weights (the rest is pretrained)")


def build_hf_student(cfg: StudentConfig, modality: str, label_names: list[str],
                     *, teacher: nn.Module | None, teacher_spec: str | None) -> nn.Module:
    spec = cfg.config or teacher_spec
    assert spec is not None  # config validation guarantees one of them
    config = load_model_config(spec, "student.config")
    overrides = dict(cfg.config_overrides)
    if cfg.init_from_teacher:
        n_teacher = getattr(teacher.config, "num_hidden_layers", None)
        layers = cfg.teacher_layers or _every_other(n_teacher)
        if n_teacher is not None and max(layers) >= n_teacher:
            raise ModelLoadError(f"student.teacher_layers: {layers} names a layer the teacher does not have "
                                 f"(it has {n_teacher}, indices 0..{n_teacher - 1})")
        overrides.setdefault("num_hidden_layers", len(layers))
        if overrides["num_hidden_layers"] != len(layers):
            raise ModelLoadError(f"student.config_overrides.num_hidden_layers={overrides['num_hidden_layers']} "
                                 f"but student.teacher_layers lists {len(layers)} layers; they must agree")
    known = set(config.to_dict())
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ModelLoadError(f"student.config_overrides.{key}: not a field of the {config.model_type} config"
                                 + (f"; did you mean {close[0]}?" if close else ""))
    config.update(overrides)
    if modality != "causal_lm":  # a language model predicts tokens, not the dataset's labels
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    model = TASK_CLASSES[modality].from_config(config)
    if cfg.init_from_teacher:
        copy_teacher_layers(model, teacher, layers)
    return model


def _every_other(n: int | None) -> list[int]:
    if not n or n < 2:
        raise ModelLoadError("student.init_from_teacher: the teacher config has no num_hidden_layers to take "
                             "a subset of; set student.teacher_layers explicitly")
    return list(range(0, n, 2))


_LAYER_INDEX = re.compile(r"(?<=\.)(layers?)\.(\d+)\.")  # encoder.layer.3. / encoder.layers.3. (not conv_layers)


def copy_teacher_layers(student: nn.Module, teacher: nn.Module, layers: list[int]) -> dict[str, int]:
    """Copy teacher weights into the student: student layer j <- teacher layer layers[j].

    Everything outside the numbered layers (embeddings, feature encoder, classifier head) is copied
    by name where shapes agree.
    """
    t_state = teacher.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, tensor in student.state_dict().items():
        m = _LAYER_INDEX.search(key)
        src = key
        if m:
            src = f"{key[:m.start()]}{m.group(1)}.{layers[int(m.group(2))]}.{key[m.end():]}"
        if src in t_state and t_state[src].shape == tensor.shape:
            new_state[key] = t_state[src].to(tensor.dtype)
        else:
            skipped.append(key)
    copied_layers = sum(1 for k in new_state if _LAYER_INDEX.search(k))
    if copied_layers == 0:
        raise ModelLoadError("student.init_from_teacher: no layer weights could be copied; the student's layer "
                             "shapes differ from the teacher's (keep hidden sizes equal, change only the depth)")
    student.load_state_dict(new_state, strict=False)
    log.info("Initialised the student from teacher layers %s (%d tensors copied, %d left at random init)",
             layers, len(new_state), len(skipped))
    return {"copied": len(new_state), "skipped": len(skipped)}


def student_logits(model: nn.Module, batch: dict[str, Any], input_key: str) -> torch.Tensor:
    """The student's forward: the log-mel CNN takes the waveform, HF models the processed inputs."""
    if input_key == "waveform":
        return model(batch["waveform"])
    return model(**batch["inputs"]).logits


def model_input_key(model: nn.Module) -> str:
    """Which part of a batch a model reads: "waveform" (the log-mel CNN) or "inputs" (transformers)."""
    return "waveform" if isinstance(model, LogMelCNN) else "inputs"


def use_channels_last(model: nn.Module, enabled: bool = True) -> bool:
    """Switch a model with 2-D convolutions to channels_last (NHWC): faster conv kernels on CUDA.
    `enabled=False` puts it back to the default layout (a teacher moved off the GPU)."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    model.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
    if isinstance(model, LogMelCNN):
        model.channels_last = enabled
    return True
