"""Student builders.

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
from kd.teachers.loading import TASK_CLASSES, load_model_config

log = logging.getLogger(__name__)


def build_student(cfg: StudentConfig, modality: str, label_names: list[str], sample_rate: int | None,
                  *, teacher: nn.Module | None = None, teacher_spec: str | None = None) -> nn.Module:
    if cfg.type == "logmel_cnn":
        return LogMelCNN(len(label_names), sample_rate=sample_rate or 16000, n_mels=cfg.n_mels,
                         channels=cfg.channels, dropout=cfg.dropout, normalize=cfg.normalize,
                         pool=cfg.pool, stem_stride=cfg.stem_stride)
    return build_hf_student(cfg, modality, label_names, teacher=teacher, teacher_spec=teacher_spec)


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
