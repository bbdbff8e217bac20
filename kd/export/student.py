"""The final student as a self-contained folder: safetensors weights, config and label names (a causal
LM: its tokenizer, ready for `AutoModelForCausalLM.from_pretrained` and `generate`). A LoRA student is
merged into plain weights there (no PEFT needed to use it), with its adapter saved beside them in
`adapter/` (PEFT's format, for `PeftModel.from_pretrained` on the original student).

Folders are written atomically (kd.atomic): an interrupted export never leaves a half-written student
behind, and the previous export stays intact until the new one is complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from kd.atomic import atomic_folder
from kd.audio.logmel_cnn import CONFIG_NAME, WEIGHTS_NAME, LogMelCNN, load_logmel_cnn
from kd.errors import ModelLoadError
from kd.lora import ADAPTER_DIR, is_lora
from kd.teachers.loading import TASK_CLASSES, resolve_model_source


def save_student(model: torch.nn.Module, path: str | Path, label_names: list[str], processor: Any = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the student to `path` (atomically); `load_student(path)` gives it back. `state_dict`: the
    weights gathered from every process (FSDP, ZeRO-3); None: the model's own."""
    with atomic_folder(path) as tmp:
        if isinstance(model, LogMelCNN):
            state = {k: v.detach().cpu().contiguous() for k, v in (state_dict or model.state_dict()).items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            config = dict(model.config, id2label={str(i): n for i, n in enumerate(label_names)})
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        else:
            if is_lora(model):
                if state_dict is not None:
                    raise ModelLoadError("a sharded LoRA student cannot be merged for export")  # refused at start
                model.save_pretrained(tmp / ADAPTER_DIR)  # adapter_config.json + adapter_model.safetensors
                # Training is over: merging in place computes the same function with plain weights.
                model = model.merge_and_unload()
            if getattr(model.config, "use_cache", None) is False:
                model.config.use_cache = True  # off for training (kd/build.py); generation wants it
            model.save_pretrained(tmp, state_dict=state_dict)  # model.safetensors + config.json (with id2label)
            if processor is not None:
                processor.save_pretrained(tmp)
    return Path(path)


def load_student(path: str | Path, modality: str | None = None) -> tuple[torch.nn.Module, list[str]]:
    """Load an exported student for inference: (model in eval mode, label names)."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not an exported student (no {CONFIG_NAME})")
    raw = json.loads(config_file.read_text())
    source, _ = resolve_model_source(str(path), "student")  # safetensors only, checked for truncation
    if raw.get("kind") == LogMelCNN.kind:
        model = load_logmel_cnn(path, "student")
        return model.eval(), list(model.label_names)
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    modality = modality or modality_of(config)
    model = TASK_CLASSES[modality].from_pretrained(source, use_safetensors=True, trust_remote_code=False)
    labels = [config.id2label[i] for i in range(config.num_labels)] if modality != "causal_lm" else []
    return model.eval(), labels


def modality_of(config: Any) -> str:
    """Which task head a transformers config belongs to (audio, text or image classification, or a causal LM)."""
    if any(name.endswith("ForCausalLM") for name in (getattr(config, "architectures", None) or [])):
        return "causal_lm"  # most LM configs also map to a classification head: the saved class decides
    for modality, auto_cls in TASK_CLASSES.items():
        if type(config) in auto_cls._model_mapping:
            return modality
    raise ModelLoadError(f"{config.model_type} has no audio, text or image classification or causal LM head "
                         "in transformers")
