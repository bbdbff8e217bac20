"""Safe teacher loading, freezing, placement and the no-grad forward.

A teacher is a transformers classifier (Hub id, model folder or .safetensors file) or a model
folder this kit exported (a log-mel CNN trained by train_kd.py, kd/logmel_cnn.py), which makes
chains possible: teacher -> assistant -> student. Weights are read from safetensors only. Pickle-based checkpoints (.bin, .pt, .pth, .ckpt) can run
arbitrary code when loaded, so they are refused with a message saying how to convert them.
`trust_remote_code` is never enabled: the model class must ship with transformers.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import httpx
import torch
from huggingface_hub import HfApi, is_offline_mode, try_to_load_from_cache
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoModelForAudioClassification,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from kd.errors import ModelLoadError, first_line
from kd.logmel_cnn import KIND as LOGMEL_KIND
from kd.logmel_cnn import LogMelCNN, load_logmel_cnn, read_kind

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TASK_CLASSES = {
    "audio": AutoModelForAudioClassification,
    "text": AutoModelForSequenceClassification,
    "image": AutoModelForImageClassification,
    "causal_lm": AutoModelForCausalLM,
}
TASK_NAMES = {"audio": "audio classifier", "text": "text classifier", "image": "image classifier",
              "causal_lm": "causal language model"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HOW_TO_CONVERT = (
    "convert it once in a trusted environment: model = AutoModelFor...from_pretrained(path); "
    "model.save_pretrained(new_folder)  # writes model.safetensors"
)


def resolve_model_source(spec: str, what: str = "teacher.model", need_weights: bool = True,
                         revision: str | None = None) -> tuple[str, Path | None]:
    """Check a model reference and return (source for from_pretrained, local weights file or None).

    Local references must exist (and, with `need_weights`, hold safetensors weights and no pickle
    in their place); anything else is taken as a Hub id, which must be in the Hugging Face cache or
    reachable on the Hub (check_hub_model).
    """
    path = Path(spec).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{what}: {spec} is a pickle checkpoint, which can execute code when loaded; only safetensors "
            f"weights are accepted ({HOW_TO_CONVERT})"
        )
    looks_local = path.exists() or spec.startswith((".", "/", "~")) or path.suffix == ".safetensors"
    if not looks_local:
        check_hub_model(spec, revision, what)
        return spec, None  # a Hub id such as "MIT/ast-finetuned-speech-commands-v2"
    if not path.exists():
        raise ModelLoadError(f"{what}: {spec} does not exist (expected a model folder, a .safetensors file or a Hub id)")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"{what}: {spec} is not a .safetensors file or a model folder")
        if not (path.parent / "config.json").is_file():
            raise ModelLoadError(f"{what}: {spec} needs a config.json beside it describing the architecture")
        check_safetensors(path, what)
        return str(path.parent), path
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{what}: {spec} is not a model folder (no config.json in it)")
    if not need_weights:
        return str(path), None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        refuse_pickle_only(path, what)
        raise ModelLoadError(f"{what}: {spec} has a config.json but no *.safetensors weights")
    for w in weights:
        check_safetensors(w, what)
    return str(path), None


@functools.cache
def check_hub_model(repo_id: str, revision: str | None, what: str) -> None:
    """A Hub id that is neither cached nor downloadable fails here, at once, with what to do.

    Left to transformers, a machine without network spends about a minute in huggingface_hub's
    retries and then reports a missing file "make sure you don't have a local directory with the
    same name". One metadata request (no retries) tells the cases apart: no network, no such model,
    gated. Ids found in the cache, and offline mode (HF_HUB_OFFLINE), never reach the network here.
    """
    if isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        return
    command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    download = f"download it once where the Hub is reachable (`{command}`) or set {what} to a local model folder"
    uncached = f"{what}: {repo_id} is not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE})"
    if is_offline_mode():
        raise ModelLoadError(f"{uncached} and HF_HUB_OFFLINE is set; {download}")
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=10)
    except httpx.TransportError as exc:  # no network, name resolution, proxy, timeout
        raise ModelLoadError(f"{uncached} and the Hub cannot be reached ({first_line(exc)}); {download}") from None
    except GatedRepoError:
        raise ModelLoadError(f"{what}: {repo_id} is gated on the Hub: accept its terms at "
                             f"https://huggingface.co/{repo_id} and log in (`hf auth login`)") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"{what}: {repo_id} has no revision {revision!r} on the Hub (a revision is a "
                             "branch, tag or commit of it)") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{what}: no model {repo_id!r} on the Hub (or it is private: log in with "
                             "`hf auth login`); check the id, or give a local model folder") from None
    except HfHubHTTPError:
        return  # the Hub answered with another error (busy, down): the download reports its own


def refuse_pickle_only(folder: Path, what: str) -> None:
    """Refuse a folder whose weights are pickles only (and no safetensors)."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{what}: {folder} holds only pickle weights ({', '.join(pickles)}), which can execute code "
            f"when loaded; only safetensors are accepted ({HOW_TO_CONVERT})"
        )


def check_safetensors(path: Path, what: str) -> None:
    """Open the header and touch every tensor's extent, so truncation is caught before training."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if keys:
                f.get_slice(keys[-1])
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{what}: {path} is not a readable safetensors file ({first_line(exc)}); "
                             "it may be truncated or corrupt, download or export it again") from None


def load_model_config(spec: str, what: str, revision: str | None = None) -> PretrainedConfig:
    source, _ = resolve_model_source(spec, what, need_weights=False, revision=revision)
    try:
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what}: cannot read the model config of {spec} ({first_line(exc)})") from None


def load_teacher(spec: str, modality: str, revision: str | None = None, dtype: str = "fp32") -> PreTrainedModel:
    """Load a classification teacher from safetensors, frozen and in eval mode (on the CPU).

    The global random state is left as it was (building a model draws its initial weights from it),
    so a student starts from the same weights whether the teacher is loaded, cached or absent: the
    KD student and its baseline share their initialisation."""
    with torch.random.fork_rng(devices=[]):
        return _load_teacher(spec, modality, revision, dtype)


def _load_teacher(spec: str, modality: str, revision: str | None, dtype: str) -> PreTrainedModel:
    source, single_file = resolve_model_source(spec, "teacher.model", revision=revision)
    if single_file is None and is_kit_model(source):
        if modality != "audio":
            raise ModelLoadError(f"teacher.model: {spec} is the kit's {LOGMEL_KIND} (audio), but data.modality "
                                 f"is {modality!r}")
        return freeze(load_logmel_cnn(source, "teacher.model").to(DTYPES[dtype]))
    cls = TASK_CLASSES[modality]
    try:
        if single_file is not None and single_file.name != "model.safetensors":
            # A lone weights file with its config.json beside it: build the architecture, then load.
            config = AutoConfig.from_pretrained(source, trust_remote_code=False)
            model = cls.from_config(config, dtype=DTYPES[dtype])
            missing, unexpected = model.load_state_dict(load_file(str(single_file)), strict=False)
            if missing:
                raise ModelLoadError(f"teacher.model: {single_file} lacks {len(missing)} weights of the "
                                     f"architecture in config.json, e.g. {missing[0]}")
        else:
            model = cls.from_pretrained(source, revision=revision, use_safetensors=True, trust_remote_code=False,
                                        dtype=DTYPES[dtype])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"teacher.model: cannot load {spec} as a {TASK_NAMES[modality]} with safetensors weights "
            f"({first_line(exc)}); if it ships pickle weights only, {HOW_TO_CONVERT}"
        ) from None
    return freeze(model)


def is_kit_model(spec: str | None) -> bool:
    """Whether `spec` is a model folder this kit exported (a log-mel CNN), not a transformers one."""
    return spec is not None and Path(spec).expanduser().is_dir() and read_kind(Path(spec).expanduser()) == LOGMEL_KIND


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (dropout off, norm statistics fixed) and no gradients: the teacher never trains."""
    model.eval()
    model.requires_grad_(False)
    return model


def teacher_logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Teacher forward under inference mode on the batch's waveform (the kit's log-mel CNN) or its
    processed inputs (transformers), moved to the teacher's device and, for inputs, its dtype.

    The forward leaves the global random state untouched (some models draw from it even in eval
    mode, e.g. wav2vec2's layer drop), so the student's dropout masks do not depend on whether the
    teacher ran or its outputs came from the cache.

    Inference mode skips autograd's bookkeeping (version counters, views) for the whole forward.
    Its tensors cannot be saved for the student's backward, which the KL term needs; so the
    logits, a (batch, classes) tensor, are cloned out of it.
    """
    param = next(model.parameters())
    # Asynchronous only towards a GPU: a non-blocking GPU -> CPU copy (teacher on the CPU, batch on
    # the GPU) may be read before it has landed.
    non_blocking = param.device.type == "cuda"
    gpus = [param.device.index or 0] if param.device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus), torch.inference_mode():
        if isinstance(model, LogMelCNN):  # computes its float32 features itself
            logits = model(batch["waveform"].to(param.device, non_blocking=non_blocking))
        else:
            moved = {k: (v.to(param.device, param.dtype, non_blocking=non_blocking) if v.is_floating_point()
                         else v.to(param.device, non_blocking=non_blocking)) for k, v in batch["inputs"].items()}
            logits = model(**moved).logits
    return logits.clone()


def load_processor(spec: str, modality: str, revision: str | None = None, what: str = "teacher.model") -> Any:
    """The model's preprocessing: feature extractor (audio), tokenizer (text) or image processor.

    `what` is the config key `spec` came from, so errors name what the user has to change.
    """
    source, _ = resolve_model_source(spec, what, need_weights=False, revision=revision)
    if what == "teacher.model":  # its weights come next: a pickle is the graver problem, so it is named first
        refuse_pickle_only(Path(source), what)
    loader = {"audio": AutoFeatureExtractor, "text": AutoTokenizer, "image": AutoImageProcessor,
              "causal_lm": AutoTokenizer}[modality]
    try:
        return loader.from_pretrained(source, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what}: cannot load the {modality} preprocessor of {spec} ({first_line(exc)}); "
                             "the model folder needs its preprocessor_config.json / tokenizer files") from None


def model_label_names(model: torch.nn.Module) -> tuple[int | None, list[str] | None]:
    """(number of labels, their names or None) of a classifier: the kit's log-mel CNN or transformers."""
    if isinstance(model, LogMelCNN):
        return model.config["num_labels"], model.label_names
    config = model.config
    n = getattr(config, "num_labels", None)
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return n, [id2label.get(i, f"LABEL_{i}") for i in range(n)] if n is not None else None


def check_label_space(model: torch.nn.Module, label_names: list[str], who: str) -> None:
    """The model must predict exactly the dataset's classes, in the same order."""
    n, names = model_label_names(model)
    if n != len(label_names):
        raise ModelLoadError(
            f"{who} predicts {n} labels but the dataset has {len(label_names)} ({', '.join(label_names[:8])}"
            f"{', ...' if len(label_names) > 8 else ''}); the teacher and student must share one label space"
        )
    if names is None or all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return  # the model carries no names; only the count can be checked
    if [s.lower() for s in names] != [s.lower() for s in label_names]:
        diffs = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(names, label_names)) if a.lower() != b.lower()]
        raise ModelLoadError(
            f"{who} label names differ from the dataset's at index {', '.join(diffs[:5])}"
            f"{' ...' if len(diffs) > 5 else ''}; map the dataset labels to the model's order"
        )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
