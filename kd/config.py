"""Typed run configuration: YAML in, a validated `Config` out.

Every key of the YAML maps to a typed field below. `load_config` reads the file with
`yaml.safe_load` (no tags that import code), applies `a.b=value` overrides, and validates everything
in one pass, so the user sees every problem at once, each with its key path, the bad value and what
is allowed. Nothing is loaded (no data, no model) before validation has passed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from kd.atomic import atomic_file
from kd.errors import ConfigError

Modality = Literal["audio", "text", "image", "causal_lm"]
# What a modality's data column is usually called, and the builders whose data says the modality.
INPUT_COLUMNS = {"audio": "audio", "image": "image", "text": "text", "causal_lm": "text"}
BUILDER_MODALITY = {"audiofolder": "audio", "speech_commands": "audio", "imagefolder": "image"}
Precision = Literal["no", "fp16", "bf16"]


@dataclass
class RunConfig:
    name: str = "kd-run"
    output_dir: str | None = None  # None: runs/<name>
    seed: int = 42
    gpu_only: bool = False
    overwrite: bool = False  # a run folder holding an earlier run: start over (its files removed) instead of refusing


@dataclass
class DataConfig:
    dataset: str = ""
    config_name: str | None = None
    revision: str | None = None  # a Hub dataset's branch, tag or commit (e.g. refs/convert/parquet)
    data_dir: str | None = None
    data_files: Any = None
    train_split: str = "train"
    eval_split: str | None = "validation"  # these two usual names are skipped where the dataset lacks them
    test_split: str | None = "test"
    modality: Modality | None = None  # null: told from data.dataset, the teacher endpoint, or the models' config
    input_column: str | None = None  # null: the modality's usual column (INPUT_COLUMNS)
    label_column: str = "label"
    weight_column: str | None = None
    sampling_rate: int | None = None
    max_seconds: float = 1.0
    max_length: int = 128  # text and causal_lm: tokens per sample (longer ones are cut)
    packing: bool = False  # causal_lm: concatenate samples into rows of exactly max_length tokens
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    preprocess_workers: int = 1
    num_workers: int = 2
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2
    decode_cache: bool = True  # False: decode audio per sample on every access (the naive path)
    features_on_device: bool = True  # False: the feature extractor runs per sample in the DataLoader

    def __post_init__(self) -> None:
        if self.modality is None:
            self.modality = BUILDER_MODALITY.get(self.dataset)
        if self.input_column is None and self.modality is not None:
            self.input_column = INPUT_COLUMNS[self.modality]

    def split_names(self) -> dict[str, str | None]:
        """The dataset's split name for each role the kit uses (None: that role is not configured)."""
        return {"train": self.train_split, "eval": self.eval_split, "test": self.test_split}


@dataclass
class EndpointConfig:
    """A teacher behind an OpenAI-compatible server (kd/teachers/remote/source.py); causal_lm only. `score`:
    it scores the data's text (echo + logprobs on /completions), token-level KD on existing data.
    `generate`: it answers the data's prompts, and the student learns prompt + answer."""

    url: str = ""  # base URL including /v1, e.g. http://127.0.0.1:8000/v1
    model: str = ""  # the model id the server answers to (GET <url>/models lists them)
    api_key_env: str | None = None  # name of the environment variable holding the key (the key is never stored)
    mode: Literal["score", "generate"] = "score"
    api: Literal["completions", "chat"] = "completions"  # generate: /completions (token ids) or /chat/completions
    max_new_tokens: int = 128  # generate: the longest answer; prompts get data.max_length - max_new_tokens - 1
    temperature: float = 0.0  # generate: 0 is greedy; one answer per prompt, cached and reused every epoch
    top_k: int = 20  # top_logprobs per position (hosted APIs allow at most 20)
    min_top_k: int = 10  # k while rate-limited; back to top_k after 10 successes in a row
    concurrency: int = 8  # requests in flight at once
    prefetch_batches: int = 4  # training batches whose requests are sent ahead of the one training (0: none)
    timeout_s: float = 60.0  # per request
    max_retries: int = 6  # per request, for 429, 5xx, timeouts and broken connections
    backoff_s: float = 0.5  # first retry delay; doubles each retry (with jitter) up to max_backoff_s
    max_backoff_s: float = 30.0
    cache_ttl_days: float | None = None  # null: cached responses never expire
    cache_read_only: bool = False  # use cached responses, never write (also --cache-read-only)
    # What the server computes in (bf16, fp32, awq-int4...): no server reports it, and answers differ
    # with it, so it is part of the response cache's key. null: not named (answers of any unnamed one match).
    precision: str | None = None
    # A server that is down, at start or once a request's retries are spent, is waited for this long
    # (probed with backoff) before the run stops at a checkpoint; 0: stop at once.
    outage_wait_s: float = 300.0


@dataclass
class TeacherConfig:
    model: str | None = None
    revision: str | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    endpoint: EndpointConfig | None = None  # a remote teacher; teacher.model then only names its tokenizer


@dataclass
class LoraConfig:
    """Low-rank adapters on a pretrained student (PEFT, kd/lora.py): only the adapters (and a new
    classification head) train, so gradients and optimizer state are those of a few percent of it."""

    rank: int = 16  # r: adapter rank; its parameters grow linearly with it
    alpha: float = 32.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.05  # dropout on the adapters' input
    # Module names (or one regex) to adapt; null: PEFT's default for the architecture (the attention
    # projections), else every linear layer but the output head.
    target_modules: list[str] | str | None = None
    # Modules that train fully beside the adapters and are saved with them; null: a classifier's head
    # (it is new for the data's labels), none for a language model.
    modules_to_save: list[str] | None = None


@dataclass
class StudentConfig:
    type: Literal["logmel_cnn", "hf"] = "logmel_cnn"
    # A pretrained student: Hub id, model folder or kit-exported student folder (safetensors only).
    model: str | None = None
    revision: str | None = None  # Hub revision of student.model
    lora: LoraConfig | None = None  # train low-rank adapters on student.model instead of every weight
    gradient_checkpointing: bool = False  # transformers students: recompute activations in backward
    n_mels: int = 40
    channels: list[int] = field(default_factory=lambda: [32, 64, 64, 128])
    dropout: float = 0.1
    config: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    init_from_teacher: bool = False
    teacher_layers: list[int] | None = None
    channels_last: bool = True
    normalize: Literal["utterance", "batch"] = "utterance"  # logmel_cnn front end (kd/audio/logmel_cnn.py)
    pool: Literal["time_max", "avg"] = "time_max"  # logmel_cnn pooling of the last feature map
    stem_stride: Literal[1, 2] = 1  # logmel_cnn first convolution's stride (2: 3.4-4.2x cheaper steps)


@dataclass
class AugmentConfig:
    """On-device waveform augmentation of training batches (kd/audio/augment.py); off unless enabled."""

    enabled: bool = False
    speed: float = 0.1  # play speed drawn from [1 - speed, 1 + speed] (tempo and pitch)
    shift_s: float = 0.1  # delay or advance each clip by up to this many seconds
    gain_db: float = 6.0  # level change drawn from [-gain_db, +gain_db]
    noise_prob: float = 0.5  # share of clips that get white noise
    noise_snr_db: list[float] = field(default_factory=lambda: [10.0, 30.0])  # its SNR range
    time_masks: int = 1  # silenced segments per clip
    time_mask_s: float = 0.1  # the longest one
    freq_masks: int = 1  # removed frequency bands per clip
    freq_mask_hz: float = 400.0  # the widest one
    mixup_alpha: float = 0.0  # > 0: mix clip pairs with Beta(alpha, alpha) weights (labels mixed alike)
    # 0: fresh draws every epoch (the teacher must run online). k >= 1: each clip has k fixed augmented
    # versions drawn from (run.seed, view, clip), epoch e trains on view e mod k, so a teacher cache can
    # store every view: the teacher runs in the first epoch only (its end fills the other views).
    views: int = 0


@dataclass
class OnPolicyConfig:
    """causal_lm: on-policy distillation (GKD, Agarwal et al. 2024; kd/lm/on_policy.py). A `share` of the
    training micro-batches is replaced by the student's own samples: it continues each row's prompt, the
    teacher scores exactly those tokens, and the loss is `divergence` over the generated positions alone."""

    share: float = 0.0  # GKD's lambda: the fraction of micro-batches the student writes (0: off, 1: all)
    max_new_tokens: int = 64  # tokens the student samples per prompt (the generation KV cache grows with it)
    temperature: float = 1.0  # sampling temperature (0: greedy)
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "reverse_kl"  # jsd uses distillation.jsd_beta
    prompt_tokens: int = 32  # plain-text rows (no prompt of their own): the first tokens taken as the prompt


@dataclass
class DistillationConfig:
    enabled: bool = True
    alpha: float = 0.5
    temperature: float = 4.0
    alpha_schedule: Literal["constant", "linear", "cosine", "step"] = "constant"
    alpha_start: float | None = None
    alpha_end: float | None = None
    alpha_step_at: float = 0.5
    # Soft targets computed once and kept on disk (kd/teachers/store.py); "auto" only where that is
    # exact, i.e. the teacher's input never changes between epochs (no augmentation).
    teacher_cache: Literal["off", "auto", "require"] = "auto"
    cache_dir: str | None = None  # null: <HF_HOME>/kd_teacher_cache, shared by every run of the same teacher
    cache_dtype: Literal["fp32", "fp16"] = "fp32"
    # null: every logit; k: the top k log-probabilities + the rest's mass (large label spaces)
    cache_top_k: int | None = None
    # causal_lm: the token-level divergence (kd/lm/losses.py); jsd is TRL GKD's generalised JSD with jsd_beta
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = 0.5
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)

    def cache_folder(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        from huggingface_hub.constants import HF_HOME  # honours HF_HOME at import time

        return Path(HF_HOME) / "kd_teacher_cache"


@dataclass
class TrainConfig:
    batch_size: int = 32
    grad_accum: int = 1
    epochs: int | None = 10
    max_steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.05
    max_grad_norm: float | None = 1.0
    mixed_precision: Precision = "no"
    compile: bool = False
    eval_every: int = 100
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2


@dataclass
class MemoryConfig:
    vram_budget_gb: float = 5.5
    on_oom: Literal["shrink", "fail"] = "shrink"
    min_micro_batch: int = 1
    auto_batch_size: bool = False
    # causal_lm: positions per loss chunk; ~6 fp32 (chunk, vocab) tensors live (49k vocab: 300 MB)
    loss_chunk: int = 256


@dataclass
class TelemetryConfig:
    log_every: int = 10
    warmup_steps: int = 2
    gpu_sample_s: float = 1.0
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]] = field(
        default_factory=list
    )


@dataclass
class ExportConfig:
    """What is written beside the final student's safetensors (kd/export/onnx.py)."""

    onnx: bool = False  # model.onnx (audio: raw waveform in, logits out), checked against PyTorch
    int8: bool = False  # model.int8.onnx too (log-mel CNN): static int8, calibrated on training clips
    check_samples: int = 64  # validation inputs the ONNX logits are compared on (atol 1e-4)
    calibration_samples: int = 256  # training clips the int8 activation ranges are measured on


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir or Path("runs") / self.run.name)

    @property
    def remote_teacher(self) -> bool:
        return self.distillation.enabled and self.teacher.endpoint is not None

    @property
    def loads_teacher_weights(self) -> bool:
        """Whether teacher.model's weights are used: local distillation, or a student started from them."""
        return (self.distillation.enabled and not self.remote_teacher) or self.student.init_from_teacher

    def uses_gpu_only_settings(self) -> list[str]:
        """The settings that only a CUDA GPU can honour, as `key: value` (empty when none)."""
        found = []
        if self.run.gpu_only:
            found.append("run.gpu_only: true")
        if self.train.mixed_precision == "fp16":
            found.append("train.mixed_precision: fp16")
        if self.teacher.device == "cuda":
            found.append("teacher.device: cuda")
        return found

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `a.b=value` overrides, validate, and return the typed config."""
    raw: dict[str, Any] = {}
    source = None
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"file not found: {p} (pass --config with a YAML file, e.g. configs/demo.yaml)"])
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            # Includes tags such as !!python/object, which safe_load refuses to construct.
            first = str(exc).strip().splitlines()
            raise ConfigError([f"not valid YAML ({' '.join(first[:3])})"], source) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"the top level must be a mapping of sections, got {type(loaded).__name__}"], source)
        raw = loaded
    problems: list[str] = []
    for item in overrides:
        _apply_override(raw, item, problems)
    try:
        cfg = config_from_dict(raw, source)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    return cfg


def config_from_dict(raw: dict[str, Any], source: str | None = None) -> Config:
    """Build and validate a Config from a plain dict (as YAML gives it)."""
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            problems.append(_unknown(str(key), SECTIONS, prefix=""))
            continue
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.append(f"{key}: must be a mapping of keys, got {_show(value)}")
            continue
        sections[key] = _build_section(key, SECTIONS[key], value, problems)
    cfg = Config(**{name: sections.get(name, SECTIONS[name]()) for name in SECTIONS})
    dist = cfg.distillation
    if cfg.data.modality is None and (cfg.teacher.endpoint is not None or dist.divergence != "forward_kl"
                                      or dist.on_policy.share > 0):
        set_modality(cfg.data, "causal_lm")  # only language models have an endpoint, another divergence, sampling
    elif cfg.data.modality is None and cfg.augment.enabled:
        set_modality(cfg.data, "audio")  # waveform augmentation
    # Value rules run even after type errors (a mistyped field keeps its default), so one pass
    # shows everything; a key already reported is not reported twice.
    reported = {p.split(":", 1)[0] for p in problems}
    problems.extend(p for p in _check_values(cfg) if p.split(":", 1)[0] not in reported)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def set_modality(data: DataConfig, modality: str) -> None:
    """Settle data.modality (told from the config or the models) and its usual input column."""
    data.modality = modality
    if data.input_column is None:
        data.input_column = INPUT_COLUMNS[modality]


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (atomically); `load_config` on the result gives back an equal Config."""
    text = "# Resolved config of this run (defaults filled in, overrides applied).\n"
    text += yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _apply_override(raw: dict[str, Any], item: str, problems: list[str]) -> None:
    if "=" not in item:
        problems.append(f"override {item!r}: expected key.path=value, e.g. train.batch_size=8")
        return
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        problems.append(f"override {item!r}: the key must name a section and a field, e.g. train.batch_size=8")
        return
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            problems.append(f"override {item!r}: {part} is not a mapping")
            return
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# Validation: types (generic, from the annotations) then values (the rules of each field)


def _build_section(name: str, cls: type, values: dict[str, Any], problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            problems.append(_unknown(str(key), hints, prefix=f"{name}."))
            continue
        nested = _nested_section(hints[key])
        if nested is not None and isinstance(value, dict):  # a section inside a section (teacher.endpoint)
            kwargs[key] = _build_section(f"{name}.{key}", nested, value, problems)
            continue
        ok, converted, expected = _coerce(value, hints[key])
        if ok:
            kwargs[key] = converted
        else:
            problems.append(f"{name}.{key}: {_show(value)} is not valid; expected {expected}")
    return cls(**kwargs)


def _nested_section(tp: Any) -> type | None:
    """The dataclass of a field typed `SomeConfig | None`, else None."""
    candidates = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or (
        [tp] if dataclasses.is_dataclass(tp) else [])
    return candidates[0] if candidates else None


def _coerce(value: Any, tp: Any) -> tuple[bool, Any, str]:
    """Check `value` against the annotation `tp`; return (ok, value, what was expected)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return True, value, "any value"
    if origin is Union or origin is types.UnionType:
        expected = []
        for arg in args:
            ok, converted, exp = _coerce(value, arg)
            if ok:
                return True, converted, ""
            expected.append(exp)
        return False, value, " or ".join(expected)
    if tp is type(None):
        return value is None, value, "null"
    if origin is Literal:
        if value is False and ("no" in args or "off" in args):
            # YAML 1.1 reads an unquoted `no` / `off` (train.mixed_precision=no, teacher_cache: off) as false
            value = "no" if "no" in args else "off"
        # Compare the type too: true == 1 and 2.0 == 2 in Python, but neither is a valid stride.
        ok = any(value == a and type(value) is type(a) for a in args)
        return ok, value, "one of " + ", ".join(repr(a) for a in args)
    if tp is bool:
        return isinstance(value, bool), value, "true or false"
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if tp is float:
        # inf and nan are numbers to YAML (.inf, .nan) and to every comparison below but a sane value of no key
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max
        return ok, float(value) if ok else value, "a finite number"
    if tp is str:
        return isinstance(value, str), value, "a string"
    if origin is list:
        (item_tp,) = args
        _, _, item_expected = _coerce(object(), item_tp)
        if not isinstance(value, list):
            return False, value, f"a list of {item_expected}"
        items = []
        for item in value:
            ok, converted, _ = _coerce(item, item_tp)
            if not ok:
                return False, value, f"a list of {item_expected}"
            items.append(converted)
        return True, items, ""
    if origin is dict:
        return isinstance(value, dict), value, "a mapping"
    if dataclasses.is_dataclass(tp):
        return False, value, "a mapping of keys"
    raise TypeError(f"unsupported annotation {tp!r}")  # a bug in this module, not user input


def _requirement(problems: list[str], prefix: str = ""):
    """`need(cond, key, value, allowed)`: records "<prefix><key>: <value> is not allowed; <allowed>" unless cond."""

    def need(cond: bool, key: str, value: Any, allowed: str) -> None:
        if not cond:
            problems.append(f"{prefix}{key}: {_show(value)} is not allowed; {allowed}")

    return need


def _check_values(cfg: Config) -> list[str]:
    problems: list[str] = []
    need = _requirement(problems)

    run, data, teacher, student = cfg.run, cfg.data, cfg.teacher, cfg.student
    dist, train, tel = cfg.distillation, cfg.train, cfg.telemetry

    need(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run.name)), "run.name", run.name,
         "use letters, digits, '.', '_' and '-' (it names the run folder)")
    need(run.seed >= 0, "run.seed", run.seed, "must be >= 0")

    need(bool(data.dataset.strip()), "data.dataset", data.dataset,
         "required: a Hub name (user/dataset), a local builder (audiofolder, imagefolder, json, csv), "
         "speech_commands (its official archive) or a save_to_disk folder")
    for key in ("train_split", "input_column", "label_column"):
        value = getattr(data, key)
        need(value is None or bool(value.strip()), f"data.{key}", value, "must not be empty")
    need(data.max_seconds > 0, "data.max_seconds", data.max_seconds, "must be > 0 (clip length in seconds)")
    for key in ("max_length", "preprocess_workers", "prefetch_factor"):
        need(getattr(data, key) >= 1, f"data.{key}", getattr(data, key), "must be an integer >= 1")
    need(data.num_workers >= 0, "data.num_workers", data.num_workers, "must be >= 0 (0 loads in the main process)")
    for key in ("sampling_rate", "max_train_samples", "max_eval_samples"):
        v = getattr(data, key)
        need(v is None or v >= 1, f"data.{key}", v, "must be null or an integer >= 1")

    if student.type == "logmel_cnn":
        need(data.modality in ("audio", None), "student.type", student.type,
             f"logmel_cnn takes audio, but data.modality is {data.modality!r}; use student.type: hf")
        need(student.n_mels >= 8, "student.n_mels", student.n_mels, "must be >= 8")
        need(len(student.channels) >= 1 and all(c >= 1 for c in student.channels), "student.channels",
             student.channels, "must be a non-empty list of integers >= 1")
    need(0.0 <= student.dropout < 1.0, "student.dropout", student.dropout, "must be in [0, 1)")
    if data.modality == "causal_lm":
        need(not (dist.enabled and dist.teacher_cache == "require" and dist.cache_top_k is None),
             "distillation.teacher_cache", dist.teacher_cache,
             "a language model's cache stores its top k per token: set distillation.cache_top_k (e.g. 64)")
    elif dist.divergence != "forward_kl":
        problems.append(f"distillation.divergence: {dist.divergence!r} is for causal_lm; classifiers use forward_kl "
                        f"(data.modality is {data.modality!r})")
    need(0.0 <= dist.jsd_beta <= 1.0, "distillation.jsd_beta", dist.jsd_beta,
         "must be in [0, 1] (0: forward KL, 1: reverse KL)")
    problems.extend(_check_on_policy(cfg))
    if student.type == "hf":
        need(student.config is not None or teacher.model is not None or student.model is not None,
             "student.config", student.config, "an hf student needs pretrained weights (student.model) or a config: "
             "a folder or Hub id with config.json, or teacher.model to start from")
    if student.model is not None:
        # Exactly one way to make a student: pretrained weights, or a config (random or teacher layers).
        clash = [key for key, used in (("student.config", student.config is not None),
                                       ("student.config_overrides", bool(student.config_overrides)),
                                       ("student.init_from_teacher", student.init_from_teacher)) if used]
        if clash:
            problems.append(f"student.model: a pretrained student takes its architecture and weights from "
                            f"{student.model}; remove {' and '.join(clash)} (they build a student from a config)")
    need(student.revision is None or student.model is not None, "student.revision", student.revision,
         "only used with student.model (a Hub id)")
    if student.gradient_checkpointing:
        need(student.type == "hf", "student.gradient_checkpointing", True,
             "needs student.type: hf (a transformers student; the log-mel CNN keeps few activations)")
    if student.lora is not None:
        problems.extend(_check_lora(student))
    if student.teacher_layers is not None:
        need(student.init_from_teacher, "student.teacher_layers", student.teacher_layers,
             "only used with student.init_from_teacher: true")
        need(len(student.teacher_layers) >= 1 and all(i >= 0 for i in student.teacher_layers),
             "student.teacher_layers", student.teacher_layers, "must list teacher layer indices >= 0")
    if student.init_from_teacher:
        need(student.type == "hf", "student.init_from_teacher", True, "needs student.type: hf")
        need(teacher.model is not None, "student.init_from_teacher", True, "needs teacher.model")

    if dist.enabled and teacher.endpoint is None:
        need(teacher.model is not None, "teacher.model", teacher.model,
             "required when distillation.enabled is true: a Hub id, a model folder or a .safetensors file "
             "(or teacher.endpoint for a remote teacher)")
    if teacher.endpoint is not None:
        problems.extend(_check_endpoint(teacher.endpoint, cfg))
    need(0.0 <= dist.alpha <= 1.0, "distillation.alpha", dist.alpha, "must be in [0, 1]")
    need(dist.temperature > 0, "distillation.temperature", dist.temperature, "must be > 0")
    for key in ("alpha_start", "alpha_end"):
        v = getattr(dist, key)
        need(v is None or 0.0 <= v <= 1.0, f"distillation.{key}", v, "must be null or in [0, 1]")
    need(0.0 < dist.alpha_step_at < 1.0, "distillation.alpha_step_at", dist.alpha_step_at,
         "must be in (0, 1): the fraction of training at which a step schedule switches")

    for key in ("batch_size", "grad_accum", "eval_every", "keep_checkpoints"):
        need(getattr(train, key) >= 1, f"train.{key}", getattr(train, key), "must be an integer >= 1")
    for key in ("epochs", "max_steps", "checkpoint_every"):
        v = getattr(train, key)
        need(v is None or v >= 1, f"train.{key}", v, "must be null or an integer >= 1")
    need(train.epochs is not None or train.max_steps is not None, "train.epochs", train.epochs,
         "set train.epochs or train.max_steps (max_steps wins when both are set)")
    need(train.lr > 0, "train.lr", train.lr, "must be > 0")
    need(train.weight_decay >= 0, "train.weight_decay", train.weight_decay, "must be >= 0")
    need(0.0 <= train.warmup_ratio < 1.0, "train.warmup_ratio", train.warmup_ratio, "must be in [0, 1)")
    need(train.max_grad_norm is None or train.max_grad_norm > 0, "train.max_grad_norm", train.max_grad_norm,
         "must be null (no clipping) or > 0")

    aug = cfg.augment
    need(dist.cache_top_k is None or dist.cache_top_k >= 1, "distillation.cache_top_k", dist.cache_top_k,
         "must be null (store every logit) or an integer >= 1")
    if dist.enabled and dist.teacher_cache == "require" and aug.enabled and not aug.views:
        problems.append("distillation.teacher_cache: 'require' cannot be combined with augment.enabled: true and "
                        "augment.views: 0 (every epoch feeds the teacher new inputs, so stored soft targets would "
                        "describe other clips); set augment.views (e.g. 4: fixed augmented versions of each clip, "
                        "each stored), augment.enabled: false or distillation.teacher_cache: off")
    need(isinstance(aug.views, int) and aug.views >= 0, "augment.views", aug.views,
         "must be an integer >= 0 (0: fresh augmentation every epoch; k: k fixed versions of each clip)")
    if aug.enabled and aug.views and aug.mixup_alpha > 0:
        problems.append(f"augment.views: {aug.views} cannot be combined with augment.mixup_alpha: {aug.mixup_alpha} "
                        "(mixup pairs clips within a batch, and batches change every epoch, so a clip's version "
                        "would not be fixed); set augment.mixup_alpha: 0 or augment.views: 0")
    if aug.enabled:
        need(data.modality in ("audio", None), "augment.enabled", True,
             f"waveform augmentation needs audio data, but data.modality is {data.modality!r}")
    need(0.0 <= aug.speed < 1.0, "augment.speed", aug.speed, "must be in [0, 1): speeds 1 +- speed")
    for key in ("shift_s", "gain_db", "time_mask_s", "freq_mask_hz", "mixup_alpha"):
        need(getattr(aug, key) >= 0, f"augment.{key}", getattr(aug, key), "must be >= 0 (0 turns it off)")
    for key in ("time_masks", "freq_masks"):
        need(getattr(aug, key) >= 0, f"augment.{key}", getattr(aug, key), "must be an integer >= 0")
    need(0.0 <= aug.noise_prob <= 1.0, "augment.noise_prob", aug.noise_prob, "must be in [0, 1]")
    need(len(aug.noise_snr_db) == 2 and aug.noise_snr_db[0] <= aug.noise_snr_db[1], "augment.noise_snr_db",
         aug.noise_snr_db, "must be [low, high] in dB with low <= high")

    need(cfg.memory.vram_budget_gb > 0, "memory.vram_budget_gb", cfg.memory.vram_budget_gb, "must be > 0 (GB)")
    need(cfg.memory.loss_chunk >= 1, "memory.loss_chunk", cfg.memory.loss_chunk,
         "must be an integer >= 1 (positions per chunk of the LM loss)")
    need(cfg.memory.min_micro_batch >= 1, "memory.min_micro_batch", cfg.memory.min_micro_batch,
         "must be an integer >= 1 (the smallest micro-batch an out-of-memory shrink may reach)")
    exp = cfg.export
    if exp.int8:
        need(exp.onnx, "export.int8", True, "needs export.onnx: true (the int8 model is made from the fp32 one)")
        need(student.type == "logmel_cnn", "export.int8", True,
             f"int8 quantisation is available for student.type: logmel_cnn, not {student.type!r}; "
             "set export.int8: false")
    for key in ("check_samples", "calibration_samples"):
        need(getattr(exp, key) >= 1, f"export.{key}", getattr(exp, key), "must be an integer >= 1")
    need(tel.log_every >= 1, "telemetry.log_every", tel.log_every, "must be an integer >= 1")
    need(tel.warmup_steps >= 0, "telemetry.warmup_steps", tel.warmup_steps, "must be >= 0")
    need(tel.gpu_sample_s > 0, "telemetry.gpu_sample_s", tel.gpu_sample_s,
         "must be > 0 (seconds between NVML readings)")
    return problems


def _check_on_policy(cfg: Config) -> list[str]:
    problems: list[str] = []
    need = _requirement(problems, prefix="distillation.on_policy.")
    op, dist, data = cfg.distillation.on_policy, cfg.distillation, cfg.data
    need(0.0 <= op.share <= 1.0, "share", op.share, "must be in [0, 1]: the fraction of micro-batches the student "
         "samples itself (GKD's lambda; 0 turns on-policy distillation off)")
    need(op.max_new_tokens >= 1, "max_new_tokens", op.max_new_tokens, "must be an integer >= 1")
    need(0.0 <= op.temperature <= 2.0, "temperature", op.temperature, "must be in [0, 2] (0: greedy)")
    need(op.prompt_tokens >= 1, "prompt_tokens", op.prompt_tokens, "must be an integer >= 1")
    if op.share == 0:
        return problems
    if data.modality != "causal_lm":
        problems.append(f"distillation.on_policy.share: on-policy distillation samples text from the student, so it "
                        f"needs data.modality: causal_lm (not {data.modality!r}); set share: 0")
        return problems
    need(dist.enabled, "share", op.share, "needs distillation.enabled: true (the teacher scores the samples)")
    need(data.max_length > op.max_new_tokens + 1, "max_new_tokens", op.max_new_tokens,
         f"must leave room for a prompt: below data.max_length - 1 = {data.max_length - 1} (prompt + sample make "
         "one row of at most data.max_length tokens)")
    if data.packing:
        problems.append("data.packing: true cannot be combined with distillation.on_policy.share > 0 (the student "
                        "continues each row's prompt; packed rows are not prompts); set data.packing: false")
    if dist.enabled and dist.teacher_cache == "require" and not cfg.remote_teacher:
        problems.append("distillation.teacher_cache: 'require' never loads the teacher, but on-policy batches "
                        "(distillation.on_policy.share > 0) need it to score the student's samples; set "
                        "teacher_cache: auto (the cache then serves the off-policy share)")
    ep = cfg.teacher.endpoint
    if ep is not None and ep.mode != "score":
        problems.append(f"distillation.on_policy.share: a remote teacher scores the student's samples in "
                        f"teacher.endpoint.mode: score, not {ep.mode!r}")
    return problems


def _check_lora(student: StudentConfig) -> list[str]:
    problems: list[str] = []
    need = _requirement(problems, prefix="student.lora.")
    lora = student.lora
    if student.type != "hf":
        problems.append("student.lora: LoRA adapts a pretrained transformers student (student.type: hf); the "
                        "log-mel CNN is small enough to train every weight: remove student.lora")
    elif student.model is None and not student.init_from_teacher:
        problems.append("student.lora: a student built from a config starts from random weights, which LoRA would "
                        "freeze; set student.model (pretrained weights) or student.init_from_teacher: true")
    need(lora.rank >= 1, "rank", lora.rank, "must be an integer >= 1 (typical: 8 to 64)")
    need(lora.alpha > 0, "alpha", lora.alpha, "must be > 0 (the adapters are scaled by alpha / rank)")
    need(0.0 <= lora.dropout < 1.0, "dropout", lora.dropout, "must be in [0, 1)")
    targets = lora.target_modules
    need(targets is None or (bool(targets) and all(str(t).strip() for t in ([targets] if isinstance(targets, str)
                                                                           else targets))),
         "target_modules", targets, "module names such as [q_proj, v_proj], one regex, 'all-linear', or null "
         "(the architecture's default)")
    return problems


def _check_endpoint(ep: EndpointConfig, cfg: Config) -> list[str]:
    problems: list[str] = []
    need = _requirement(problems, prefix="teacher.endpoint.")

    need(bool(re.match(r"https?://[^/\s]+", ep.url)), "url", ep.url,
         "the server's base URL with its scheme, e.g. http://127.0.0.1:8000/v1")
    need(bool(ep.model.strip()), "model", ep.model, "the model id the server serves (GET <url>/models lists them)")
    need(ep.api_key_env is None or bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", ep.api_key_env)), "api_key_env",
         ep.api_key_env, "the NAME of an environment variable holding the key (never the key itself)")
    need(1 <= ep.top_k <= 20, "top_k", ep.top_k, "must be in [1, 20] (OpenAI-compatible servers allow at most 20)")
    need(1 <= ep.min_top_k <= ep.top_k, "min_top_k", ep.min_top_k, f"must be in [1, top_k={ep.top_k}]")
    need(ep.concurrency >= 1, "concurrency", ep.concurrency, "must be an integer >= 1")
    need(ep.prefetch_batches >= 0, "prefetch_batches", ep.prefetch_batches,
         "must be an integer >= 0 (0: a batch's requests are sent when it trains)")
    need(ep.max_retries >= 0, "max_retries", ep.max_retries, "must be >= 0")
    for key in ("timeout_s", "backoff_s", "max_backoff_s"):
        need(getattr(ep, key) > 0, key, getattr(ep, key), "must be > 0 (seconds)")
    need(ep.precision is None or bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,39}", str(ep.precision))),
         "precision", ep.precision, "a short name of what the server computes in, e.g. bf16, fp32 or awq-int4 "
         "(letters, digits, . _ + -), or null")
    need(ep.outage_wait_s >= 0, "outage_wait_s", ep.outage_wait_s, "must be >= 0 seconds (0: stop at once)")
    need(ep.cache_ttl_days is None or ep.cache_ttl_days > 0, "cache_ttl_days", ep.cache_ttl_days,
         "must be null (never expire) or > 0")
    if ep.mode == "score":
        need(ep.api == "completions", "api", ep.api, "must be 'completions' in score mode (chat endpoints cannot "
             "score given text; mode: generate asks /chat/completions for answers)")
    else:
        need(ep.max_new_tokens >= 1, "max_new_tokens", ep.max_new_tokens, "must be an integer >= 1")
        need(cfg.data.max_length > ep.max_new_tokens + 1, "max_new_tokens", ep.max_new_tokens,
             f"must leave room for a prompt: below data.max_length - 1 = {cfg.data.max_length - 1} (prompt + answer "
             "+ end token make one row of at most data.max_length tokens)")
        need(0.0 <= ep.temperature <= 2.0, "temperature", ep.temperature, "must be in [0, 2] (0: greedy)")
        need(not cfg.data.packing, "mode", ep.mode, "generate needs data.packing: false (each row is one prompt the "
             "teacher answers; packed rows are not prompts)")
    if not cfg.teacher.model and not cfg.student.config and not cfg.student.model:
        problems.append("teacher.endpoint: the student needs the teacher's tokenizer; set teacher.model (a folder "
                        "or Hub id with the tokenizer; weights only for student.init_from_teacher), student.config "
                        "or student.model")
    if cfg.data.modality != "causal_lm":
        problems.append(f"teacher.endpoint: a remote teacher gives next-token log-probabilities, so it needs "
                        f"data.modality: causal_lm (not {cfg.data.modality!r})")
    return problems


def _unknown(key: str, known: typing.Iterable[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(known)}"
    return f"{prefix}{key}: unknown key{hint}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
