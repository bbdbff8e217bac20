"""A teacher's identity: everything that can change its outputs, hashed into the key of what is cached
from it (kd/teachers/store.py, and a remote teacher's answers in kd/teachers/remote/response_cache.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kd.teachers.loading import resolve_model_source
from kd.teachers.store import file_sha256


def teacher_weight_files(spec: str, revision: str | None) -> list[Path]:
    """The teacher's safetensors files, local or from the Hugging Face cache (safetensors only)."""
    source, single = resolve_model_source(spec, "teacher.model", revision=revision)
    if single is not None:
        return [single]
    if Path(source).is_dir():
        return sorted(Path(source).glob("*.safetensors"))
    from huggingface_hub import snapshot_download

    folder = snapshot_download(source, revision=revision, allow_patterns=["*.safetensors", "*.json"])
    return sorted(Path(folder).glob("*.safetensors"))


def preprocessing_identity(processor: Any) -> Any:
    """What of the teacher's preprocessing can change its inputs: the processor's own config."""
    if processor is None:
        return None
    if hasattr(processor, "get_vocab"):  # a tokenizer: its class, vocabulary and special tokens
        vocab = processor.get_vocab()
        return {"class": type(processor).__name__,
                "vocab": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
                "special": {k: str(v) for k, v in sorted(processor.special_tokens_map.items())},
                "padding_side": getattr(processor, "padding_side", None)}
    config = processor.to_dict() if hasattr(processor, "to_dict") else {"class": type(processor).__name__}
    config.pop("processor_class", None)
    return config


def teacher_identity(cfg: Any, processor: Any, *, sampling_rate: int | None, device_kind: str,
                     features_on_device: bool) -> dict[str, Any]:
    files = teacher_weight_files(cfg.teacher.model, cfg.teacher.revision)
    half = cfg.teacher.dtype != "fp32"
    return {
        "weights": {p.name: file_sha256(p) for p in files},
        "dtype": cfg.teacher.dtype,
        "device": device_kind if half else "any",  # fp32 outputs are portable between CPU and CUDA
        "autocast": cfg.train.mixed_precision,
        "modality": cfg.data.modality,
        "preprocessing": preprocessing_identity(processor),
        "features_on_device": features_on_device if processor is not None else None,
        "sampling_rate": sampling_rate,
        "max_seconds": cfg.data.max_seconds if cfg.data.modality == "audio" else None,
        "max_length": cfg.data.max_length if cfg.data.modality in ("text", "causal_lm") else None,
        # causal_lm: the splits' fingerprints hash the token rows the teacher reads (template, packing
        # and truncation included); the chat template is named here too for a readable identity
        "chat_template": (hashlib.sha256(str(getattr(processor, "chat_template", "")).encode()).hexdigest()[:16]
                          if cfg.data.modality == "causal_lm" else None),
    }
