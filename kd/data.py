"""Datasets by name, preprocessing through the datasets cache, and DataLoaders.

`data.dataset` is a Hub name (google/speech_commands), a local builder (audiofolder, imagefolder,
json, csv, parquet, text) pointed at `data.data_dir` / `data.data_files`, or a `save_to_disk` folder.

Audio is decoded with soundfile (WAV/FLAC/OGG without FFmpeg), mixed to mono, resampled to the
teacher's rate and cut or padded to `data.max_seconds`, once, inside `Dataset.map`: the datasets
cache keeps the result (a memory-mapped Arrow file), so later runs and later epochs do no decoding.
`data.decode_cache: false` decodes on every access instead (no disk cost, CPU work every epoch).

The teacher's feature extractor runs batched on the device when kd.audio.features has a version of it
(`data.features_on_device`); otherwise per clip in the collate function, in the DataLoader workers.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import soundfile
import torch
import torchaudio
from datasets import (
    Audio,
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    Sequence,
    Value,
    load_dataset,
    load_dataset_builder,
    load_from_disk,
)
from datasets.exceptions import DatasetGenerationError
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch.utils.data import DataLoader

from kd.audio.features import DeviceFeatures, device_features
from kd.audio.path_audio import PathAudio
from kd.audio.speech_commands import NAME as SPEECH_COMMANDS
from kd.audio.speech_commands import check_source as check_speech_commands
from kd.audio.speech_commands import load_speech_commands
from kd.config import DataConfig, EndpointConfig
from kd.errors import DataError, first_line
from kd.hub import parquet_export
from kd.lm.data import LMCollator, prepare_lm_splits, prepare_prompt_splits

log = logging.getLogger(__name__)

# Hub script datasets the kit reads another way.
SCRIPT_REPLACEMENTS = {
    "google/speech_commands": f"data.dataset: {SPEECH_COMMANDS} (the kit reads its official archive)",
}
# The splits' usual names, which are also the defaults: a dataset without one has no such evaluation.
USUAL_SPLITS = {"eval": "validation", "test": "test"}
LOCAL_BUILDERS = ("audiofolder", "imagefolder", "json", "csv", "parquet", "text", "arrow")
WAVEFORM = "waveform"
INDEX = "sample_index"  # each sample's position in its split: what the teacher cache keys rows by


@dataclass
class PreparedData:
    splits: dict[str, Dataset]  # keys: train, eval, test (those configured)
    label_names: list[str]
    sampling_rate: int | None
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    features: DeviceFeatures | None = None  # computes batch["inputs"] from the waveform on the device
    fingerprints: dict[str, str] | None = None  # content hash of each split's inputs (teacher-cache keys)


def load_raw_splits(cfg: DataConfig) -> dict[str, Dataset]:
    """Load the dataset and return {role: split} for train/eval/test, checking names and columns."""
    dd = _load(cfg)
    roles = cfg.split_names()
    for role, usual in USUAL_SPLITS.items():
        if roles[role] == usual and usual not in dd:
            roles[role] = None  # the usual name (the default) and no such split: that evaluation is left out
    missing = [f"data.{role}_split={name!r}" for role, name in roles.items() if name is not None and name not in dd]
    if missing:
        raise DataError(f"{cfg.dataset}: split not found ({', '.join(missing)}); the dataset has: "
                        f"{', '.join(dd.keys()) or 'no splits'}")
    splits = {role: dd[name] for role, name in roles.items() if name is not None}
    for role, ds in splits.items():
        if len(ds) == 0:
            raise DataError(f"{cfg.dataset} split {roles[role]!r} is empty")
        if cfg.modality == "causal_lm":
            continue  # its columns are checked by kd/lm/data.py (text, prompt/completion or messages)
        needed = {"data.input_column": cfg.input_column, "data.label_column": cfg.label_column}
        if cfg.weight_column:
            needed["data.weight_column"] = cfg.weight_column
        absent = [f"{key}={col!r}" for key, col in needed.items() if col not in ds.column_names]
        if absent:
            raise DataError(f"{cfg.dataset} split {roles[role]!r}: column not found ({', '.join(absent)}); "
                            f"its columns are: {', '.join(ds.column_names)}")
        for key, col in needed.items():  # an empty CSV cell, a null in JSON: counted from Arrow, nothing decoded
            empty = ds.data.column(col).null_count
            if empty:
                raise DataError(f"{cfg.dataset} split {roles[role]!r}: {empty} of {len(ds)} rows have no value in "
                                f"{key}={col!r}; fill them in or remove those rows")
    for role in [r for r in splits if r != "train" and unlabelled(splits[r], cfg.label_column)]:
        if roles[role] != USUAL_SPLITS[role]:
            raise DataError(f"{cfg.dataset} split {roles[role]!r} (data.{role}_split) has no labels (every "
                            "label is -1, as in a benchmark's hidden test set); name a labelled split")
        del splits[role]  # the default name and a hidden test set: that evaluation is left out (build says so)
    return splits


def unlabelled(ds: Dataset, column: str) -> bool:
    """Whether every label is -1: benchmarks (GLUE, SuperGLUE) publish their test split that way."""
    feature = ds.features.get(column)  # None for a language model's text, which has no label column
    integer = isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype.startswith("int"))
    return integer and ds.unique(column) == [-1]


def _load(cfg: DataConfig) -> DatasetDict:
    name = cfg.dataset
    path = Path(name).expanduser()
    if cfg.revision is not None and (name in LOCAL_BUILDERS or name == SPEECH_COMMANDS or path.exists()):
        raise DataError(f"data.revision: {cfg.revision!r} names a revision of a Hub dataset, but data.dataset={name!r} "
                        "is read locally; remove data.revision")
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            loaded = load_from_disk(str(path))
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        if name in LOCAL_BUILDERS:
            absent = [f for f in local_files(cfg.data_files) if not glob.glob(f)]
            if absent:
                raise DataError(f"data.data_files: no such file: {', '.join(absent)}")
            if cfg.data_dir is None and cfg.data_files is None:
                raise DataError(f"data.dataset={name!r} is a local builder: set data.data_dir or data.data_files")
            if cfg.data_dir is not None and not Path(cfg.data_dir).expanduser().is_dir():
                raise DataError(f"data.data_dir: {cfg.data_dir} is not a folder")
            if name == "audiofolder":
                return _load_audiofolder(cfg)
            return load_dataset(name, data_dir=cfg.data_dir, data_files=cfg.data_files)
        if name == SPEECH_COMMANDS:
            return load_speech_commands(cfg.config_name, cfg.data_files, cfg.data_dir)
        if not path.exists() and not is_hub_name(name):
            raise DataError(f"data.dataset: no such folder: {name} (a Hub dataset is named namespace/name; local "
                            "files are read by data.dataset: audiofolder / imagefolder / csv / json / parquet with "
                            "data.data_dir or data.data_files)")
        if path.exists():
            raise DataError(f"data.dataset: {name} is a folder but not a save_to_disk dataset (no dataset_dict.json "
                            f"or state.json); for a folder of files use data.dataset: audiofolder / imagefolder "
                            f"with data.data_dir: {name}")
        return load_dataset(name, cfg.config_name, data_dir=cfg.data_dir, data_files=cfg.data_files,
                            revision=cfg.revision)
    except DataError:
        raise
    except RuntimeError as exc:
        script = re.search(r"Dataset scripts are no longer supported, but found (\S+)", str(exc))
        if script is None:
            raise
        raise DataError(script_dataset_advice(name, script.group(1))) from None
    except Exception as exc:  # datasets raises many types (FileNotFound, ConnectionError, ValueError, ...)
        # ConnectionError: the Hub could not be asked (offline) and datasets' cache lacks the name.
        hint = ("; it is not in the datasets cache: load it once where the Hub is reachable (the cache keeps it), "
                "or give a local copy (a save_to_disk folder, or data.dataset: audiofolder / imagefolder / csv / "
                "json with data.data_dir)") if isinstance(exc, ConnectionError) else ""
        config = f" (config {cfg.config_name!r})" if cfg.config_name else ""
        files = f" from data.data_files={cfg.data_files}" if cfg.data_files else ""
        raise DataError(f"data.dataset: cannot load {name!r}{config}{files}: {why(exc)}{hint}") from None


def local_files(data_files: Any) -> list[str]:
    """The local paths (or glob patterns) in data.data_files (a path, a list, or a split mapping)."""
    if data_files is None:
        return []
    values = data_files.values() if isinstance(data_files, dict) else [data_files]
    paths = [v for value in values for v in (value if isinstance(value, list) else [value])]
    return [str(Path(p).expanduser()) for p in paths if isinstance(p, str) and "://" not in p]


def why(exc: BaseException) -> str:
    """The first line of what went wrong: datasets wraps a builder's failure ("An error occurred while
    generating the dataset") around the reader's own (an empty file, malformed JSON), which says more."""
    while isinstance(exc, DatasetGenerationError) and (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    text = first_line(exc)
    empty = re.fullmatch(r'Instruction "(.+)" corresponds to no data!', text)
    return f"its {empty.group(1)} split has no rows" if empty else text


def is_hub_name(name: str) -> bool:
    """Whether `name` can name a Hub dataset (`name` or `namespace/name`), rather than a local path."""
    if name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_data_source(cfg: DataConfig) -> str | None:
    """Before anything loads: fail at once when the data must be downloaded and cannot be now.
    Returns what a first run will download, if that is known (the kit's own archive builders)."""
    if cfg.dataset == SPEECH_COMMANDS:
        return check_speech_commands(cfg.config_name, cfg.data_files, cfg.data_dir)
    return None  # a Hub dataset: datasets itself tells a missing name from a missing network


def script_dataset_advice(name: str, script: str) -> str:
    """One line for a Hub dataset that is a loading script: datasets >= 4 runs none, so say what loads."""
    ways = []
    if name in SCRIPT_REPLACEMENTS:
        ways.append(SCRIPT_REPLACEMENTS[name])
    export = parquet_export(name)
    if export is not None:
        ways.append(f"data.revision: {export} (the Hub's Parquet export of it)")
    ways.append("a local copy (data.dataset: audiofolder / imagefolder / csv / json / parquet with data.data_dir, "
                "or a save_to_disk folder)")
    return (f"data.dataset: {name} is a loading script on the Hub ({script}), and datasets >= 4 runs no dataset "
            f"scripts; use {'; or '.join(ways)}")


def _load_audiofolder(cfg: DataConfig) -> DatasetDict:
    """The audiofolder builder, made to work where torchcodec/FFmpeg are missing.

    The stock builder infers the features (labels from folder names or metadata columns) and then
    fails at its first example if torchcodec cannot load; we then build again with those features and
    the audio column stored by PathAudio. Where torchcodec works, the first attempt is the result.
    """
    kwargs = {"data_dir": cfg.data_dir, "data_files": cfg.data_files}
    builder = load_dataset_builder("audiofolder", **kwargs)
    try:
        builder.download_and_prepare()
        return builder.as_dataset()
    except DatasetGenerationError as exc:
        if not _missing_codec(exc) or builder.info.features is None:
            raise
    features = Features({k: PathAudio() if isinstance(v, Audio) else v for k, v in builder.info.features.items()})
    return load_dataset("audiofolder", features=features, **kwargs)


def _missing_codec(exc: BaseException | None) -> bool:
    while exc is not None:
        if "torchcodec" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def resolve_labels(splits: dict[str, Dataset], column: str,
                   order: list[str] | None = None) -> tuple[dict[str, Dataset], list[str]]:
    """Label names from the dataset features; string labels become a ClassLabel shared by all splits.

    `order`: a teacher's label names. When the dataset names the same classes (in any case and
    order), its label ids are remapped to that order: labels are matched by name, never by index."""
    splits, names = _class_labels(splits, column)
    if order and names != order and sorted(n.lower() for n in names) == sorted(n.lower() for n in order):
        label2id = {name: i for i, name in enumerate(order)}
        splits = {role: ds.align_labels_with_mapping(label2id, column) for role, ds in splits.items()}
        names = list(order)
    return splits, names


def _class_labels(splits: dict[str, Dataset], column: str) -> tuple[dict[str, Dataset], list[str]]:
    feature = splits["train"].features[column]
    if isinstance(feature, ClassLabel):
        return splits, list(feature.names)
    values = splits["train"].unique(column)
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        names = sorted(str(v) for v in values)
        for role, ds in splits.items():
            unknown = sorted(set(ds.unique(column)) - set(names))
            if unknown:
                raise DataError(f"split {role!r} has labels the training split lacks: {', '.join(unknown[:8])}")
        label_feature = ClassLabel(names=names)
        return {role: ds.cast_column(column, label_feature) for role, ds in splits.items()}, names
    if isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
        n = max(int(v) for v in values) + 1
        return splits, [str(i) for i in range(n)]
    raise DataError(f"data.label_column={column!r} has type {feature}; expected class labels (ClassLabel, "
                    "integers or strings)")


def prepare_data(cfg: DataConfig, processor: Any = None, sampling_rate: int | None = None,
                 answered_by: EndpointConfig | None = None, label_order: list[str] | None = None) -> PreparedData:
    """Load, check, subsample, preprocess (cached) and describe the configured splits; every sample
    carries its index in the split (batch["index"]), and every split a content hash of its inputs
    (the teacher cache's split key). `answered_by`: a remote teacher in generate mode, which writes
    the answers, so the splits hold prompts only. `label_order`: the teacher's label names, which
    the dataset's labels are mapped onto by name."""
    splits = load_raw_splits(cfg)
    if cfg.modality is None:  # build_run settles it from the models first; a direct caller names it
        raise DataError(f"data.modality: not set and {cfg.dataset!r} does not tell it; set data.modality: audio, "
                        "text, image or causal_lm")
    if cfg.modality == "causal_lm":
        return _prepare_lm(cfg, _subsample(cfg, splits), processor, answered_by)
    splits, label_names = resolve_labels(splits, cfg.label_column, label_order)  # before subsampling
    splits = _subsample(cfg, splits)
    data = _prepare(cfg, splits, label_names, processor, sampling_rate=sampling_rate)
    data.fingerprints = {role: content_fingerprint(ds, cfg.input_column) for role, ds in splits.items()}
    data.splits = {role: ds.add_column(INDEX, np.arange(len(ds), dtype=np.int64)) for role, ds in data.splits.items()}
    return data


def _subsample(cfg: DataConfig, splits: dict[str, Dataset]) -> dict[str, Dataset]:
    limits = {"train": cfg.max_train_samples, "eval": cfg.max_eval_samples, "test": cfg.max_eval_samples}
    return {r: (ds.select(range(min(limits[r], len(ds)))) if limits[r] else ds) for r, ds in splits.items()}


def _prepare_lm(cfg: DataConfig, splits: dict[str, Dataset], tokenizer: Any,
                answered_by: EndpointConfig | None = None) -> PreparedData:
    """Causal-LM splits (kd/lm/data.py): no label space, the tokenizer's vocabulary is the output."""
    if tokenizer is None:
        raise DataError("causal_lm data needs a tokenizer: set teacher.model (or student.config) to a model folder "
                        "with tokenizer files")
    if answered_by is not None:
        splits = prepare_prompt_splits(splits, cfg, tokenizer, chat=answered_by.api == "chat",
                                       budget=cfg.max_length - answered_by.max_new_tokens - 1)
    else:
        splits = prepare_lm_splits(splits, cfg, tokenizer)
    # The teacher cache keys rows by the token rows the teacher reads and the positions learnt.
    fingerprints = {role: content_fingerprint(ds, ["input_ids", "loss_mask"]) for role, ds in splits.items()}
    splits = {role: ds.add_column(INDEX, np.arange(len(ds), dtype=np.int64)) for role, ds in splits.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PreparedData(splits, [], None, LMCollator(pad), fingerprints=fingerprints)


def content_fingerprint(ds: Dataset, columns: str | list[str]) -> str:
    """A hash of a split's inputs as stored (text, audio/image bytes, or file paths with their size and
    modification time), in order. Unlike the datasets fingerprint it is the same in every process and
    every run, so the teacher cache can key rows by it; any edit to an input changes it."""
    columns = [columns] if isinstance(columns, str) else columns
    digest = hashlib.sha256()
    for table in ds.select_columns(columns).with_format("arrow").iter(batch_size=1024):
        for value in (v for name in columns for v in table.column(name).to_pylist()):
            if isinstance(value, dict):  # Audio / Image storage: {"bytes": ..., "path": ...}
                if value.get("bytes"):
                    digest.update(hashlib.sha256(value["bytes"]).digest())
                else:
                    path = Path(value.get("path") or "")
                    stat = path.stat() if path.is_file() else None
                    digest.update(f"{path}|{stat.st_size if stat else -1}|{stat.st_mtime_ns if stat else -1}".encode())
            else:
                digest.update(repr(value).encode())
            digest.update(b"\x00")
    return f"{len(ds)}-{digest.hexdigest()[:16]}"


def _prepare(cfg: DataConfig, splits: dict[str, Dataset], label_names: list[str], processor: Any,
             *, sampling_rate: int | None) -> PreparedData:
    """Preprocess (cached by datasets) and describe the configured splits."""
    keep = [cfg.label_column] + ([cfg.weight_column] if cfg.weight_column else [])
    if cfg.modality == "audio":
        rate = sampling_rate or 16000
        decode = decode_audio if cfg.decode_cache else decode_on_access
        splits = {r: decode(ds, cfg, rate, keep) for r, ds in splits.items()}
        features = device_features(processor) if cfg.features_on_device else None
        collate = AudioCollator(cfg.label_column, cfg.weight_column, None if features else processor, rate)
        return PreparedData(splits, label_names, rate, collate, features=features)
    if cfg.modality == "text":
        if processor is None:
            raise DataError("text data needs a tokenizer: set teacher.model (or student.config) to a model folder "
                            "with tokenizer files")
        splits = {r: tokenize(ds, cfg, processor, keep) for r, ds in splits.items()}
        check_tokenizer_covers(splits["train"], processor)
        return PreparedData(splits, label_names, None, TextCollator(cfg.label_column, cfg.weight_column, processor))
    if processor is None:
        raise DataError("image data needs an image processor: set teacher.model (or student.config) to a model "
                        "folder with preprocessor_config.json")
    splits = {r: _undecoded_images(ds, cfg.input_column) for r, ds in splits.items()}
    collate = ImageCollator(cfg.input_column, cfg.label_column, cfg.weight_column, processor)
    return PreparedData(splits, label_names, None, collate)


# ---------------------------------------------------------------------------------------------
# Audio


def decode_audio(ds: Dataset, cfg: DataConfig, rate: int, keep: list[str]) -> Dataset:
    """Decode every clip once into a fixed-length float32 column, kept in the datasets cache."""
    num_samples = int(round(cfg.max_seconds * rate))
    ds = _undecoded(ds, cfg.input_column)
    features = Features({WAVEFORM: Sequence(Value("float32"), length=num_samples),
                         **{c: ds.features[c] for c in keep}})
    fn = functools.partial(_decode_batch, column=cfg.input_column, rate=rate, num_samples=num_samples)
    out = ds.map(fn, batched=True, batch_size=64, features=features, num_proc=_num_proc(cfg, len(ds)),
                 remove_columns=[c for c in ds.column_names if c not in keep], desc=f"Decoding audio at {rate} Hz")
    return out.with_format("torch")


def decode_on_access(ds: Dataset, cfg: DataConfig, rate: int, keep: list[str]) -> Dataset:
    """Decode clips when they are read (in the DataLoader workers), every epoch: nothing cached."""
    num_samples = int(round(cfg.max_seconds * rate))
    ds = _undecoded(ds, cfg.input_column).select_columns([cfg.input_column, *keep])
    return ds.with_transform(functools.partial(_decode_rows, column=cfg.input_column, rate=rate,
                                               num_samples=num_samples, keep=keep))


def _undecoded(ds: Dataset, column: str) -> Dataset:
    feature = ds.features[column]
    if isinstance(feature, Audio):
        return ds.cast_column(column, Audio(decode=False))  # raw bytes/paths: we decode with soundfile
    if feature != Value("string"):
        raise DataError(f"data.input_column={column!r} holds {feature}; audio data needs an Audio "
                        "column or a column of file paths")
    return ds


def _decode_rows(batch: dict[str, list], column: str, rate: int, num_samples: int, keep: list[str]) -> dict[str, list]:
    waves = [torch.from_numpy(load_waveform(item, rate, num_samples)) for item in batch[column]]
    return {WAVEFORM: waves, **{c: batch[c] for c in [*keep, INDEX] if c in batch}}


def _decode_batch(batch: dict[str, list], column: str, rate: int, num_samples: int) -> dict[str, list]:
    return {WAVEFORM: [load_waveform(item, rate, num_samples) for item in batch[column]]}


def load_waveform(item: dict[str, Any] | str, rate: int, num_samples: int) -> np.ndarray:
    """Decode one clip (path or bytes) to mono float32 at `rate`, cut or zero-padded to `num_samples`."""
    if isinstance(item, str):
        item = {"path": item, "bytes": None}
    source = io.BytesIO(item["bytes"]) if item.get("bytes") else item.get("path")
    if isinstance(source, str) and not Path(source).is_file():
        raise DataError(f"audio file {source} is listed in the dataset but does not exist")
    try:
        audio, orig_rate = soundfile.read(source, dtype="float32", always_2d=True)
    except Exception as exc:
        raise DataError(f"cannot decode audio {item.get('path') or '<bytes>'}: {exc} (WAV, FLAC and OGG are "
                        "read without FFmpeg; convert other formats to one of those)") from None
    wave = torch.from_numpy(audio.mean(axis=1))
    if orig_rate != rate:
        wave = torchaudio.functional.resample(wave, orig_rate, rate)
    if wave.numel() >= num_samples:
        start = (wave.numel() - num_samples) // 2  # keep the middle, where a keyword usually is
        wave = wave[start:start + num_samples]
    else:
        wave = torch.nn.functional.pad(wave, (0, num_samples - wave.numel()))
    return wave.numpy()


class AudioCollator:
    """Stacks waveforms; adds the teacher's processed inputs when a feature extractor is given."""

    def __init__(self, label_column: str, weight_column: str | None, processor: Any, rate: int):
        self.label_column, self.weight_column = label_column, weight_column
        self.processor, self.rate = processor, rate

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        waveform = torch.stack([r[WAVEFORM] for r in rows])
        batch = _labels_and_weights(rows, self.label_column, self.weight_column)
        batch[WAVEFORM] = waveform
        if self.processor is not None:
            processed = self.processor(list(waveform.numpy()), sampling_rate=self.rate, return_tensors="pt")
            batch["inputs"] = dict(processed)
        return batch


# ---------------------------------------------------------------------------------------------
# Text and images


def tokenize(ds: Dataset, cfg: DataConfig, tokenizer: Any, keep: list[str]) -> Dataset:
    fn = functools.partial(_tokenize_batch, tokenizer=tokenizer, column=cfg.input_column, max_length=cfg.max_length)
    return ds.map(fn, batched=True, num_proc=_num_proc(cfg, len(ds)),
                  remove_columns=[c for c in ds.column_names if c not in keep], desc="Tokenizing")


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, column: str, max_length: int) -> dict[str, Any]:
    return dict(tokenizer(batch[column], truncation=True, max_length=max_length))


UNKNOWN_AT_MOST = 0.5  # share of a text's tokens a tokenizer may map to its unknown token
TOKENIZER_CHECK_ROWS = 256


def check_tokenizer_covers(ds: Dataset, tokenizer: Any) -> None:
    """Refuse a tokenizer that does not know the training text: with most tokens mapped to [UNK] a
    model can learn nothing from it, and training would end at chance with no error (a model folder
    saved without its own tokenizer files gets a blank one that knows only the special tokens)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return  # byte-level vocabularies have no unknown token
    special = set(getattr(tokenizer, "all_special_ids", []) or []) - {unk}
    ids = [i for row in ds.select(range(min(TOKENIZER_CHECK_ROWS, len(ds))))["input_ids"] for i in row
           if i not in special]
    share = sum(i == unk for i in ids) / max(1, len(ids))
    if share > UNKNOWN_AT_MOST:
        raise DataError(f"the tokenizer of {tokenizer.name_or_path} turns {share:.0%} of the first "
                        f"{min(TOKENIZER_CHECK_ROWS, len(ds))} training texts' tokens into {tokenizer.unk_token} "
                        f"(its vocabulary has {len(tokenizer)} entries): it does not cover this text, so nothing "
                        "could be learnt; save the tokenizer the model was trained with in that folder "
                        "(tokenizer.json or vocab.txt), or train one on your text (docs/data.md)")


class TextCollator:
    def __init__(self, label_column: str, weight_column: str | None, tokenizer: Any):
        self.label_column, self.weight_column, self.tokenizer = label_column, weight_column, tokenizer

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = _labels_and_weights(rows, self.label_column, self.weight_column)
        fields = [{k: v for k, v in r.items() if k not in (self.label_column, self.weight_column, INDEX)} for r in rows]
        batch["inputs"] = dict(self.tokenizer.pad(fields, return_tensors="pt"))  # pad to the longest in the batch
        return batch


def _undecoded_images(ds: Dataset, column: str) -> Dataset:
    """Images stay as stored (bytes or a path) until the collator opens them, so that one that does
    not decode is named by its file rather than failing inside datasets' row access."""
    feature = ds.features[column]
    if isinstance(feature, Image):
        return ds.cast_column(column, Image(decode=False))
    if feature != Value("string"):
        raise DataError(f"data.input_column={column!r} holds {feature}; image data needs an Image column or a "
                        "column of file paths")
    return ds


def open_image(item: dict[str, Any] | str) -> PIL.Image.Image:
    """An RGB image from datasets' storage ({"bytes", "path"}) or a path; one line if it does not decode."""
    if isinstance(item, str):
        item = {"path": item, "bytes": None}
    name = item.get("path") or "an image stored in the dataset"
    try:
        with PIL.Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as image:
            return image.convert("RGB")
    except (OSError, ValueError, TypeError) as exc:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise DataError(f"cannot decode image {name}: {first_line(exc)}") from None


class ImageCollator:
    def __init__(self, image_column: str, label_column: str, weight_column: str | None, processor: Any):
        self.image_column, self.label_column, self.weight_column = image_column, label_column, weight_column
        self.processor = processor

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = _labels_and_weights(rows, self.label_column, self.weight_column)
        images = [open_image(r[self.image_column]) for r in rows]
        batch["inputs"] = dict(self.processor(images, return_tensors="pt"))
        return batch


def _labels_and_weights(rows: list[dict[str, Any]], label_column: str, weight_column: str | None) -> dict[str, Any]:
    batch: dict[str, Any] = {"labels": torch.as_tensor([int(r[label_column]) for r in rows], dtype=torch.long)}
    if weight_column:
        batch["sample_weight"] = torch.as_tensor([float(r[weight_column]) for r in rows], dtype=torch.float32)
    if INDEX in rows[0]:
        # A plain list: it stays on the host when Accelerate moves the batch, so the teacher cache
        # looks its rows up without reading anything back from the GPU.
        batch["index"] = [int(r[INDEX]) for r in rows]
    return batch


def queued_copy(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`; towards a GPU through page-locked memory, so the copy is queued and waits
    for nothing (a copy from ordinary, pageable memory first waits for the GPU to finish its queue)."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _num_proc(cfg: DataConfig, n_rows: int) -> int | None:
    workers = min(cfg.preprocess_workers, max(1, n_rows // 256))
    return workers if workers > 1 else None


def make_loader(ds: Dataset, cfg: DataConfig, batch_size: int, *, collate: Callable, shuffle: bool,
                pin_memory: bool, seed: int = 0) -> DataLoader:
    """A DataLoader with the configured worker settings (pinned memory only where there is a GPU).

    It gets its own random generator: otherwise every new iterator draws the workers' base seed
    from the global RNG, and a resumed run (which opens one extra iterator mid-epoch) would see
    different dropout masks from the run it continues.
    """
    workers = cfg.num_workers
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory and cfg.pin_memory,
        persistent_workers=cfg.persistent_workers and workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
    )
