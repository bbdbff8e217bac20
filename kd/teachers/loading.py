"""Safe teacher loading, freezing, placement and the no-grad forward.

A teacher is a transformers classifier (Hub id, model folder or .safetensors file) or a model
folder this kit exported (a log-mel CNN trained by train_kd.py, kd/audio/logmel_cnn.py), which makes
chains possible: teacher -> assistant -> student. Weights are read from safetensors only.
Pickle-based checkpoints (.bin, .pt, .pth, .ckpt) can run arbitrary code when loaded, so they are
refused with a message saying how to convert them.
`trust_remote_code` is never enabled: the model class must ship with transformers.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import httpx
import torch
from huggingface_hub import HfApi, is_offline_mode, try_to_load_from_cache
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
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
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from kd.audio.logmel_cnn import KIND as LOGMEL_KIND
from kd.audio.logmel_cnn import LogMelCNN, load_logmel_cnn, read_kind
from kd.audio.logmel_cnn import read_config as read_kit_config
from kd.errors import ModelLoadError, first_line
from kd.hub import safetensors_pull_request

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TASK_CLASSES = {
    "audio": AutoModelForAudioClassification,
    "text": AutoModelForSequenceClassification,
    "image": AutoModelForImageClassification,
    "causal_lm": AutoModelForCausalLM,
}
# model type -> the class name of its model for each modality's task (transformers' Auto mappings)
TASK_MAPPINGS = {"audio": MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
                 "text": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                 "image": MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
                 "causal_lm": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
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
    if is_hub_id(spec):
        check_hub_model(spec, revision, what, need_weights)
        return spec, None  # a Hub id such as "MIT/ast-finetuned-speech-commands-v2"
    if not path.exists():
        raise ModelLoadError(f"{what}: no such folder or file: {spec} (expected a model folder, a .safetensors "
                             "file or a Hub id such as namespace/name)")
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


def is_hub_id(spec: str) -> bool:
    """Whether a model reference names a Hub repository (`name` or `namespace/name`); anything else,
    `runs/text-teacher/student` included, is a local folder or file."""
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or path.suffix == ".safetensors":
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def check_hub_model(repo_id: str, revision: str | None, what: str, need_weights: bool = False) -> None:
    """A Hub id that is neither cached nor downloadable fails here, at once, with what to do.

    Left to transformers, a machine without network spends about a minute in huggingface_hub's
    retries and then reports a missing file "make sure you don't have a local directory with the
    same name". One metadata request (no retries) tells the cases apart: no network, no such model,
    gated. Its answer lists the revision's files, so with `need_weights` a model whose weights are
    pickles only is refused before anything is downloaded (check_hub_weights). Ids found in the
    cache, and offline mode (HF_HUB_OFFLINE), never reach the network here.
    """
    cached = isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    if cached and (not need_weights or is_offline_mode() or _safetensors_cached(repo_id, revision)):
        return
    if is_offline_mode():
        raise ModelLoadError(f"{_uncached(repo_id, what)} and HF_HUB_OFFLINE is set; "
                             f"{_download(repo_id, revision, what)}")
    files = hub_files(repo_id, revision, what)
    if need_weights and files is not None:
        check_hub_weights(repo_id, revision, list(files), what)


@functools.cache
def hub_files(repo_id: str, revision: str | None, what: str) -> tuple[str, ...] | None:
    """The files of a Hub model at `revision`, from one metadata request per run (None: the Hub
    answered with an error of its own, busy or down, which the download will report)."""
    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=10)
    except httpx.TransportError as exc:  # no network, name resolution, proxy, timeout
        raise ModelLoadError(f"{_uncached(repo_id, what)} and the Hub cannot be reached ({first_line(exc)}); "
                             f"{_download(repo_id, revision, what)}") from None
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
        return None
    return tuple(s.rfilename for s in info.siblings or [])


def _uncached(repo_id: str, what: str) -> str:
    return f"{what}: {repo_id} is not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE})"


def _download(repo_id: str, revision: str | None, what: str) -> str:
    command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    return f"download it once where the Hub is reachable (`{command}`) or set {what} to a local model folder"


def _safetensors_cached(repo_id: str, revision: str | None) -> bool:
    return any(isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str)
               for name in ("model.safetensors", "model.safetensors.index.json"))


def check_hub_weights(repo_id: str, revision: str | None, files: list[str], what: str) -> None:
    """Refuse a Hub revision whose weights are pickles only, naming where safetensors of it are.

    The Hub's conversion bot often has a pull request with `model.safetensors` for such a model;
    its revision (`refs/pr/<n>`) is what `teacher.revision` should say."""
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = sorted(name for name in files if name.lower().endswith(PICKLE_SUFFIXES))
    if not pickles:
        return  # no weights the kit knows of: transformers names what it looked for
    at = f"{repo_id} at revision {revision or 'main'}"
    refused = (f"{what}: {at} has only pickle weights ({', '.join(pickles)}), which can execute code when "
               "loaded; only safetensors are accepted")
    converted = safetensors_pull_request(repo_id)
    if converted is not None and converted != revision:
        key = "teacher.revision" if what == "teacher.model" else "its revision"
        raise ModelLoadError(f"{refused}. The Hub's safetensors conversion of it is the pull request {converted}: "
                             f"set {key}: {converted}")
    raise ModelLoadError(f"{refused}, and the Hub has no safetensors conversion of it; {HOW_TO_CONVERT}, and set "
                         f"{what} to that folder")


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


def modality_of(spec: str, what: str, revision: str | None = None) -> str | None:
    """The data a model takes, told by its config: the task its architecture is built for (the kit's
    log-mel CNN: audio); None when the config does not say."""
    if is_kit_model(spec):
        return "audio"
    config = load_model_config(spec, what, revision)
    architectures = set(getattr(config, "architectures", None) or [])
    tasks = {modality: names[config.model_type] for modality, names in TASK_MAPPINGS.items()
             if config.model_type in names}
    named = [modality for modality, cls in tasks.items() if cls in architectures]
    if len(named) == 1:
        return named[0]
    return next(iter(tasks)) if len(tasks) == 1 else None


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
    return freeze(load_pretrained(spec, modality, revision, dtype))


def load_pretrained(spec: str, modality: str, revision: str | None = None, dtype: str = "fp32",
                    what: str = "teacher.model", config: PretrainedConfig | None = None) -> torch.nn.Module:
    """A model from safetensors weights: a transformers model with the modality's head (from a Hub id,
    a folder or a lone .safetensors file with its config.json) or a log-mel CNN the kit exported.
    `config`: the model's config with changes (a student's new labels); the weights that no longer
    fit it (the old head) are left newly initialised."""
    source, single_file = resolve_model_source(spec, what, revision=revision)
    if single_file is None and is_kit_model(source):
        if modality != "audio":
            raise ModelLoadError(f"{what}: {spec} is the kit's {LOGMEL_KIND} (audio), but data.modality "
                                 f"is {modality!r}")
        return load_logmel_cnn(source, what).to(DTYPES[dtype])
    cls = TASK_CLASSES[modality]
    changed = config is not None
    config = config or load_model_config(spec, what, revision)  # a cut-off config.json is named as such
    try:
        if single_file is not None and single_file.name != "model.safetensors":
            # A lone weights file with its config.json beside it: build the architecture, then load.
            model = cls.from_config(config, dtype=DTYPES[dtype])
            weights = load_file(str(single_file))
            if changed:  # keep what fits the changed config
                shapes = model.state_dict()
                weights = {k: v for k, v in weights.items() if k in shapes and shapes[k].shape == v.shape}
            missing, unexpected = model.load_state_dict(weights, strict=False)
            if missing and not changed:
                raise ModelLoadError(f"{what}: {single_file} lacks {len(missing)} weights of the "
                                     f"architecture in config.json, e.g. {missing[0]}")
        else:
            model = cls.from_pretrained(source, config=config, revision=revision, use_safetensors=True,
                                        trust_remote_code=False, dtype=DTYPES[dtype],
                                        ignore_mismatched_sizes=changed)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"{what}: cannot load {spec} as a {TASK_NAMES[modality]} with safetensors weights "
            f"({first_line(exc)}); if it ships pickle weights only, {HOW_TO_CONVERT}"
        ) from None
    except RuntimeError as exc:  # torch's "size mismatch for <weight>", which transformers reports above its own
        mismatch = re.search(r"size mismatch for ([\w.]+)", str(exc))
        raise ModelLoadError(
            f"{what}: the weights of {spec} do not fit the architecture its config.json describes"
            f"{f' ({mismatch.group(1)} has another shape)' if mismatch else ''}: the config was edited or belongs "
            "to another checkpoint") from None
    return model


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
        if Path(source).is_dir():
            refuse_pickle_only(Path(source), what)
        else:  # a Hub id: its file list, before anything is downloaded
            check_hub_model(source, revision, what, need_weights=True)
    loader = {"audio": AutoFeatureExtractor, "text": AutoTokenizer, "image": AutoImageProcessor,
              "causal_lm": AutoTokenizer}[modality]
    try:
        return loader.from_pretrained(source, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        files = "tokenizer files (tokenizer.json or a vocabulary)" if loader is AutoTokenizer else \
            "preprocessor_config.json"
        if Path(source).is_dir():  # transformers' own message is a paragraph about the Hub
            raise ModelLoadError(f"{what}: {spec} has no usable {files} for its {modality} inputs; copy them from "
                                 "the model's original repository into the folder") from None
        raise ModelLoadError(f"{what}: cannot load the {modality} preprocessor of {spec} ({first_line(exc)}); "
                             f"the model needs its {files}") from None


def label_space(config: PretrainedConfig | dict[str, Any]) -> tuple[int | None, list[str] | None]:
    """(number of labels, their names or None) from a classifier's config, transformers' or the kit's
    (a dict); names are None where the config carries only transformers' placeholders (LABEL_0, ...)."""
    if isinstance(config, dict):
        n, id2label = config.get("num_labels"), config.get("id2label")
    else:
        n, id2label = getattr(config, "num_labels", None), getattr(config, "id2label", None)
    if n is None:
        return None, None
    id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
    names = [id2label.get(i, f"LABEL_{i}") for i in range(n)]
    return n, None if all(name == f"LABEL_{i}" for i, name in enumerate(names)) else names


def model_label_names(model: torch.nn.Module) -> tuple[int | None, list[str] | None]:
    """(number of labels, their names or None) of a classifier: the kit's log-mel CNN or transformers."""
    if isinstance(model, LogMelCNN):
        names = dict(enumerate(model.label_names or []))
        return label_space({"num_labels": model.config["num_labels"], "id2label": names})
    return label_space(model.config)


def teacher_label_space(spec: str, revision: str | None = None) -> tuple[int | None, list[str] | None]:
    """The teacher's labels from its config alone (no weights loaded): what the data is mapped onto."""
    if is_kit_model(spec):
        return label_space(read_kit_config(Path(spec).expanduser(), "teacher.model"))
    return label_space(load_model_config(spec, "teacher.model", revision))


def check_label_space(model: torch.nn.Module, label_names: list[str], who: str) -> None:
    """The model must predict exactly the dataset's classes, in the same order."""
    check_labels(*model_label_names(model), label_names, who)


def check_labels(n: int | None, names: list[str] | None, label_names: list[str], who: str) -> None:
    """A classifier with `n` labels called `names` (None: unnamed) against the dataset's classes:
    the same names (any case), as many, in the same order."""
    if names is not None:
        ours, theirs = {s.lower() for s in label_names}, {s.lower() for s in names}
        if ours != theirs:
            lacks = sorted(name for name in label_names if name.lower() not in theirs)
            extra = sorted(name for name in names if name.lower() not in ours)
            parts = ([f"the dataset has {_listed(lacks)} that it does not predict"] if lacks else []) + (
                [f"it predicts {_listed(extra)} that the dataset lacks"] if extra else [])
            raise ModelLoadError(f"{who} and the dataset name different labels: {'; '.join(parts)}. Labels are "
                                 "matched by name, so the two must name the same classes")
    if n != len(label_names):
        raise ModelLoadError(
            f"{who} predicts {n} labels but the dataset has {len(label_names)} ({_listed(label_names)}); "
            "the teacher and student must share one label space"
        )
    if names is not None and [s.lower() for s in names] != [s.lower() for s in label_names]:
        diffs = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(names, label_names)) if a.lower() != b.lower()]
        raise ModelLoadError(
            f"{who} label names differ from the dataset's at index {', '.join(diffs[:5])}"
            f"{' ...' if len(diffs) > 5 else ''}; map the dataset labels to the model's order"
        )


def _listed(names: list[str], at_most: int = 8) -> str:
    return ", ".join(names[:at_most]) + (f", ... ({len(names)} in all)" if len(names) > at_most else "")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
