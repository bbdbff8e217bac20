"""Assemble a run from a validated config: accelerator, data, teacher, student.

Order matters for the user: cheap checks that can fail (GPU present, precision supported) come
before anything slow (dataset decoding, model loading), and the dataset's label space is known
before either model is built, so a teacher/student/label mismatch stops the run before training.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Any

import accelerate
import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import TorchDynamoPlugin, set_seed

from kd.audio.logmel_cnn import read_config as read_kit_config
from kd.config import Config, config_from_dict, set_modality
from kd.data import PreparedData, check_data_source, prepare_data
from kd.errors import ConfigError, DataError, ModelLoadError, SourceError, TrainingError
from kd.lm.planner import describe, plan_from_configs, sampling_bytes
from kd.lm.vocabulary import check_shared_vocabulary, cut_to_tokenizer
from kd.lora import is_lora, trainable_parameters
from kd.memory import cuda_index
from kd.preflight import (
    Estimate,
    advice,
    choose_teacher_device,
    estimate_memory,
    fmt,
    format_estimate,
    largest_fitting_micro_batch,
    with_generation,
)
from kd.students import build_student, model_input_key, use_channels_last
from kd.teachers.factory import LazyTeacher, open_soft_targets
from kd.teachers.loading import (
    check_hub_model,
    check_labels,
    count_parameters,
    is_hub_id,
    is_kit_model,
    label_space,
    load_model_config,
    load_processor,
    modality_of,
    teacher_label_space,
)
from kd.teachers.source import SoftTargetSource

# The Python package each Accelerate tracker needs (telemetry.report_to).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


@dataclass(kw_only=True)
class Run:
    cfg: Config
    accelerator: Accelerator
    data: PreparedData
    student: torch.nn.Module
    processor: Any
    input_key: str  # "waveform" (log-mel student) or "inputs" (transformers student)
    env: dict[str, Any]
    params: dict[str, int | None]
    estimate: Estimate | None = None
    advice: list[tuple[str, int]] = field(default_factory=list)
    soft_targets: SoftTargetSource | None = None  # None: no distillation

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The teacher model in memory for training (None: no KD, a remote one, or every soft target on disk)."""
        return self.soft_targets.teacher if self.soft_targets is not None else None


def build_run(cfg: Config, plan_only: bool = False, precompute: bool = False) -> Run:
    """`plan_only` (--preflight): a config that targets a GPU may be planned on a machine without one.
    `precompute` (--precompute-teacher): the teacher is loaded whenever the cache lacks anything."""
    planning_elsewhere = plan_only and not torch.cuda.is_available()
    check_device(cfg, gpu_settings=not planning_elsewhere)
    set_seed(cfg.run.seed)
    gpu_settings = cfg.uses_gpu_only_settings()
    if planning_elsewhere and gpu_settings:
        print(f"Planning for a CUDA GPU on a machine without one ({', '.join(gpu_settings)}): the activations "
              "are counted analytically, not measured; the GPU settings are checked when training")
    accelerator = Accelerator(
        # fp16 autocast exists on CUDA only; a plan made elsewhere still counts 16-bit activations.
        mixed_precision=("no" if planning_elsewhere and cfg.train.mixed_precision == "fp16"
                         else cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=cfg.telemetry.report_to or None,
        project_dir=str(cfg.output_dir),
        # Seedable sampler: the shuffle order of epoch e depends only on (seed, e), which is what lets
        # --resume continue on exactly the next batch. non_blocking: pinned batches copy asynchronously.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=cfg.data.pin_memory),
        # train.compile: Accelerate wraps the student in torch.compile when it prepares it. Stated
        # either way, so an `accelerate config` default does not silently decide it.
        dynamo_plugin=TorchDynamoPlugin(backend="inductor" if cfg.train.compile else "no"),
    )
    say = accelerator.print
    env = describe_environment(accelerator)
    if env["gpu_name"]:
        say(f"GPU: {env['gpu_name']}, {env['gpu_total_bytes'] / 2**30:.1f} GiB, precision {env['mixed_precision']}")
    else:
        say(f"Device: {accelerator.device}, precision {env['mixed_precision']}, processes {env['world_size']}")

    for note in check_sources(cfg):
        say(note)
    settle_modality(cfg, say)
    source, key = processor_source(cfg)
    processor = None
    if source is not None:
        revision = {"teacher.model": cfg.teacher.revision, "student.model": cfg.student.revision}.get(key)
        processor = load_processor(source, cfg.data.modality, revision, key)
    rate = sampling_rate(cfg, processor)
    teacher_labels = labels_of_teacher(cfg)
    order = teacher_labels[1] if teacher_labels else labels_of_pretrained_student(cfg)
    with accelerator.main_process_first():  # the first process fills the datasets cache, the others reuse it
        generate = cfg.teacher.endpoint if cfg.remote_teacher and cfg.teacher.endpoint.mode == "generate" else None
        data = prepare_data(cfg.data, processor, rate, answered_by=generate, label_order=order)
    for role, key in (("eval", "eval_split"), ("test", "test_split")):
        name = getattr(cfg.data, key)
        if name is not None and role not in data.splits:
            say(f"No labelled {name!r} split in {cfg.data.dataset}: no {'validation' if role == 'eval' else 'test'} "
                f"evaluation (data.{key})")
    if teacher_labels is not None:  # before the teacher cache is opened or the teacher loaded
        check_labels(*teacher_labels, data.label_names, f"teacher {cfg.teacher.model}")
    if generate is not None:
        say(f"Data: {len(data.splits['train'])} training prompts (the remote teacher writes the answers), "
            f"vocabulary {len(processor)} tokens")
    elif cfg.data.modality == "causal_lm":
        say(f"Data: {len(data.splits['train'])} training sequences, vocabulary {len(processor)} tokens")
    else:
        say(f"Data: {len(data.splits['train'])} training samples, {len(data.label_names)} labels")

    # Loaded once, where a source or the student's initialisation needs it.
    lm_tokens = len(processor) if cfg.data.modality == "causal_lm" and processor is not None else None
    teacher = LazyTeacher(cfg, tokens=lm_tokens)
    soft_targets = open_soft_targets(cfg, accelerator, data, processor, teacher=teacher, plan_only=plan_only,
                                     precompute=precompute)
    student = build_student(cfg.student, cfg.data.modality, data.label_names, data.sampling_rate,
                            teacher=teacher() if cfg.student.init_from_teacher else None,
                            teacher_spec=cfg.teacher.model, say=say)
    if cfg.data.modality == "causal_lm":
        prepare_language_models(cfg, processor, teacher.model, student)
    if is_lora(student) and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise ConfigError([f"student.lora: not supported yet under {accelerator.distributed_type.value} (the merged "
                           "export needs the whole model in one process); use DDP (accelerate launch "
                           "--multi_gpu) or train every weight"])
    if cfg.distillation.on_policy.share > 0 and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise ConfigError([f"distillation.on_policy: not supported yet under {accelerator.distributed_type.value} "
                           "(the student samples with its whole weights in each process); use DDP (accelerate "
                           "launch --multi_gpu) or set distillation.on_policy.share: 0"])
    # The teacher that runs in training (None: no KD, a remote one, or every soft target on disk).
    running = soft_targets.teacher if soft_targets is not None else None
    if data.features is not None:
        data.features.to(accelerator.device)
    describe_features(cfg, data, processor, accelerator)
    if cfg.augment.enabled and processor is not None and data.features is None:
        # The collate function would compute the model inputs from the clean clip, while the student
        # sees the augmented one: the soft targets would describe another input.
        why = ("data.features_on_device is false" if not cfg.data.features_on_device
               else f"{type(processor).__name__} has no on-device version in kd/audio/features.py")
        raise ConfigError([f"augment.enabled: the model inputs must be computed from the augmented waveform on "
                           f"the device, but {why}; set data.features_on_device: true or augment.enabled: false"])
    estimate, advice = plan_memory(cfg, accelerator, data, teacher=running, student=student,
                                   input_key=model_input_key(student))
    if running is not None and next(running.parameters()).device.type == "cpu" and cfg.teacher.dtype != "fp32":
        say(f"Note: the teacher runs on the CPU in {cfg.teacher.dtype}; CPUs rarely have fast half-precision "
            "kernels (an AST forward measured 6x slower than in fp32), so teacher.dtype: fp32 is faster there")
    if accelerator.device.type == "cuda" and cfg.data.pin_memory:
        say("Non-blocking transfers enabled")
    params = {"teacher": count_parameters(running) if running is not None else None,
              "student": count_parameters(student), "student_trainable": trainable_parameters(student)}
    frozen = params["student_trainable"] != params["student"]
    say(f"Parameters: teacher {_fmt_count(params['teacher'])}, student {_fmt_count(params['student'])}"
        + (f" ({_fmt_count(params['student_trainable'])} trainable)" if frozen else ""))
    return Run(cfg=cfg, accelerator=accelerator, data=data, student=student, processor=processor,
               input_key=model_input_key(student), env=env, params=params, estimate=estimate, advice=advice,
               soft_targets=soft_targets)


def preflight_from_configs(cfg: Config) -> bool:
    """--preflight of a causal LM run: planned from the models' config.json files alone (kd/lm/planner.py),
    printed with the advice; False for other modalities (their pre-flight loads the run)."""
    for note in check_sources(cfg):
        print(note)
    settle_modality(cfg, print)
    if cfg.data.modality != "causal_lm":
        return False
    plan = plan_from_configs(cfg)
    budget = int(cfg.memory.vram_budget_gb * 1e9)
    print(describe(plan, cfg))
    print(format_estimate(plan.estimate, budget))
    helps = advice(plan.estimate, cfg, budget, None) if plan.estimate.total > budget else []
    if helps:
        print(f"Over the budget by {fmt(plan.estimate.total - budget)}. What would help, largest estimated saving "
              "first:")
        for text, saving in helps:
            print(f"  - {text}  (~{fmt(saving)})")
    return True


def check_sources(cfg: Config) -> list[str]:
    """Every Hub model and downloaded dataset the run needs, checked before anything loads, so a
    machine without network learns at once everything it cannot get (one line each). Returns notes
    on what a first run will download."""
    models = [(key, spec, revision) for key, spec, revision in (
        ("teacher.model", cfg.teacher.model, cfg.teacher.revision), ("student.config", cfg.student.config, None),
        ("student.model", cfg.student.model, cfg.student.revision)) if spec and is_hub_id(spec)]
    problems, notes = [], []
    for key, spec, revision in models:
        weights = (key == "teacher.model" and cfg.loads_teacher_weights) or key == "student.model"
        try:
            check_hub_model(spec, revision, key, need_weights=weights)
        except ModelLoadError as exc:
            problems.append(str(exc))
    try:
        notes.append(check_data_source(cfg.data))
    except DataError as exc:
        problems.append(str(exc))
    if problems:
        raise SourceError(problems)
    return [note for note in notes if note]


def settle_modality(cfg: Config, say) -> None:
    """data.modality when the config does not tell it: from the teacher's config (or the student's),
    whose architecture names the task; else one error naming the key. The settled config is checked
    again (what depends on the modality: the student type, augmentation, the divergence)."""
    if cfg.data.modality is not None:
        return
    key, spec, revision = (("teacher.model", cfg.teacher.model, cfg.teacher.revision) if cfg.teacher.model
                           else ("student.model", cfg.student.model, cfg.student.revision) if cfg.student.model
                           else ("student.config", cfg.student.config, None))
    told = modality_of(spec, key, revision) if spec else None
    if told is None:
        models = f"nor does {key} ({spec})" if spec else "and no model is named"
        raise ConfigError([f"data.modality: not set, and data.dataset ({cfg.data.dataset!r}) does not tell it, "
                           f"{models}; set data.modality: audio, text, image or causal_lm"])
    set_modality(cfg.data, told)
    say(f"Data modality: {told} (from {key}; set data.modality to say it), input column {cfg.data.input_column!r}")
    config_from_dict(cfg.to_dict())  # raises ConfigError with every problem the settled modality shows


def labels_of_teacher(cfg: Config) -> tuple[int | None, list[str] | None] | None:
    """The local teacher's classes (count, names) from its config, where its labels matter: the data
    is mapped onto them by name, and checked against them before any teacher weights load."""
    if not cfg.loads_teacher_weights or cfg.data.modality == "causal_lm":
        return None
    return teacher_label_space(cfg.teacher.model, cfg.teacher.revision)


def labels_of_pretrained_student(cfg: Config) -> list[str] | None:
    """Without a teacher's labels, a pretrained classifier student's (student.model) order the data's
    classes, so that its head is kept where it names the same classes."""
    if not cfg.student.model or cfg.data.modality == "causal_lm":
        return None
    key = "student.model"
    if is_kit_model(cfg.student.model):
        return label_space(read_kit_config(cfg.student.model, key))[1]
    return label_space(load_model_config(cfg.student.model, key, cfg.student.revision))[1]


def prepare_language_models(cfg: Config, tokenizer: Any, teacher: torch.nn.Module | None,
                            student: torch.nn.Module) -> None:
    """Causal LMs: one vocabulary for teacher and student (checked before anything trains), and no
    KV cache in training forwards (it would only hold memory: every forward sees whole sequences)."""
    if cfg.remote_teacher and len(tokenizer) > student.config.vocab_size:
        raise ModelLoadError(f"the student's logits cover {student.config.vocab_size} token ids but the tokenizer "
                             f"shared with the remote teacher has {len(tokenizer)}; build the student with "
                             "that tokenizer's vocabulary size")
    if teacher is not None:
        check_shared_vocabulary(tokenizer, student_tokenizer(cfg), teacher_width=teacher.config.vocab_size,
                                student_width=student.config.vocab_size, teacher_name=cfg.teacher.model,
                                student_name=cfg.student.model or cfg.student.config or
                                f"built from {cfg.teacher.model}'s config")
        teacher.config.use_cache = False
    student.config.use_cache = False
    # Logit rows past the tokenizer are padding (Qwen2.5 pads 7B and 0.5B differently): cut them off
    # (the teacher's are cut as it loads, kd/teachers/factory.py).
    cut = cut_to_tokenizer(student, len(tokenizer))
    if cut:
        print(f"Student {cut}")


def student_tokenizer(cfg: Config) -> Any:
    """The tokenizer shipped with student.model or student.config, if it has one (None: it reads the
    teacher's tokens)."""
    spec, key = (cfg.student.model, "student.model") if cfg.student.model else (cfg.student.config, "student.config")
    if not spec or spec == cfg.teacher.model:
        return None
    try:
        return load_processor(spec, "causal_lm", cfg.student.revision if cfg.student.model else None, what=key)
    except ModelLoadError:
        return None  # a bare config folder: the student uses the teacher's tokenizer


def describe_features(cfg: Config, data: PreparedData, processor: Any, accelerator: Accelerator) -> None:
    """Say where the audio model's features are computed (data.features_on_device)."""
    if cfg.data.modality != "audio" or processor is None:
        return
    name = type(processor).__name__
    if data.features is not None:
        accelerator.print(f"Features: {name} computed in batches on the {accelerator.device.type.upper()}")
    elif cfg.data.features_on_device:
        accelerator.print(f"Features: {name} has no on-device version in kd/audio/features.py; it runs per clip "
                          "in the DataLoader workers")
    else:
        accelerator.print(f"Features: {name} per clip in the DataLoader workers (data.features_on_device: false)")


def processor_source(cfg: Config) -> tuple[str | None, str | None]:
    """Where the preprocessing comes from, and the config key that names it.

    The teacher's when distilling; otherwise the transformers student's own folder (or the teacher
    folder it is built from). The kit's log-mel CNN, teacher or student, needs none: it takes waveforms.
    """
    own = ((cfg.student.model, "student.model") if cfg.student.model and not is_kit_model(cfg.student.model)
           else (cfg.student.config, "student.config") if cfg.student.config else (None, None))
    if cfg.remote_teacher and not cfg.teacher.model:  # the tokenizer shared with the server: the student's
        return own
    if cfg.distillation.enabled:
        if is_kit_model(cfg.teacher.model):
            return None, None
        return cfg.teacher.model, "teacher.model"
    if cfg.student.type == "hf":
        if own[0]:
            return own
        return cfg.teacher.model, "teacher.model"
    return None, None


def choose_batch_size(cfg: Config, probe, budget: int, say) -> None:
    """memory.auto_batch_size: the largest micro-batch that fits, same effective batch (sets cfg.train)."""
    effective = cfg.train.batch_size * cfg.train.grad_accum

    def fits(micro: int) -> bool:
        try:
            return probe(micro).total <= budget
        except torch.OutOfMemoryError:  # a real probe step that did not fit
            return False
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    micro = largest_fitting_micro_batch(effective, fits)
    if micro == 0:
        say(f"Auto batch size: not even a micro-batch of 1 fits the {budget / 1e9:.2f} GB budget; "
            f"keeping {cfg.train.batch_size} x {cfg.train.grad_accum} (see the advice below)")
        return
    cfg.train.batch_size, cfg.train.grad_accum = micro, effective // micro
    say(f"Auto batch size: micro-batch {micro} x accumulation {effective // micro} (effective batch {effective}), "
        f"the largest that fits the {budget / 1e9:.2f} GB budget")


def check_device(cfg: Config, gpu_settings: bool = True) -> None:
    """Fail at start, before any loading, when the config asks for a GPU that is not there
    (`gpu_settings=False`: planning only, those are checked where the run trains)."""
    has_cuda = torch.cuda.is_available() or not gpu_settings
    if cfg.run.gpu_only and not has_cuda:
        raise TrainingError("run.gpu_only is true but no CUDA GPU is visible to PyTorch (check nvidia-smi and "
                            "CUDA_VISIBLE_DEVICES); set run.gpu_only: false to allow training on the CPU")
    if cfg.train.mixed_precision == "fp16" and not has_cuda:
        raise ConfigError(["train.mixed_precision: 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on the CPU"])
    if cfg.teacher.device == "cuda" and not has_cuda:
        raise ConfigError(["teacher.device: 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'"])
    if cfg.remote_teacher:
        from kd.teachers.remote.source import api_key

        api_key(cfg.teacher.endpoint)  # the key's variable is set (its value is never printed or stored)
    missing = [name for name in cfg.telemetry.report_to if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None]
    if missing:
        raise ConfigError([f"telemetry.report_to: {name!r} is not installed (pip install {TRACKER_PACKAGES[name]}) "
                           "or remove it from the list" for name in missing])
    if cfg.export.onnx:  # checked now, not after hours of training
        absent = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
        if absent:
            raise ConfigError([f"export.onnx: true needs {', '.join(absent)} (pip install -e '.[onnx]'), "
                               "or set export.onnx: false"])


def plan_memory(cfg: Config, accelerator: Accelerator, data: PreparedData, *, teacher: torch.nn.Module | None,
                student: torch.nn.Module, input_key: str) -> tuple[Estimate, list[tuple[str, int]]]:
    """Cap the process to the budget, estimate memory, place the teacher, and say what would help."""
    say, device = accelerator.print, accelerator.device
    budget = int(cfg.memory.vram_budget_gb * 1e9)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, budget / total)
        torch.cuda.set_per_process_memory_fraction(fraction, cuda_index(device))
        say(f"Memory capped to the {budget / 1e9:.2f} GB budget ({100 * fraction:.0f}% of {total / 1e9:.1f} GB)")
        student.to(device)
        # The layout training uses, before the probe: it measures the kernels training will run.
        if cfg.student.channels_last and use_channels_last(student):
            say("Using channels_last memory format")
    # Teacher next to the student unless told otherwise: logits then never cross the bus.
    on_gpu = teacher is not None and cfg.teacher.device != "cpu"
    if on_gpu and device.type == "cuda":
        teacher.to(device)
        use_channels_last(teacher)
    train = data.splits["train"]
    # The model inputs are computed in the step only when a model reads them (as in the trainer).
    features = data.features if data.features is not None and (input_key == "inputs" or teacher is not None) else None

    def probe(micro: int) -> Estimate:
        # A full micro-batch on the GPU (measured); two samples on the CPU, scaled (analytic). A
        # micro-batch too big for the cap is measured at half, a quarter, ... and scaled: the
        # estimate then says it does not fit, where the probe itself would have crashed the start.
        rows = micro if device.type == "cuda" else min(2, micro)
        while True:
            batch = data.collate([train[i % len(train)] for i in range(rows)])
            try:
                est = estimate_memory(teacher, student, batch, input_key, micro_batch=micro,
                                      mixed_precision=cfg.train.mixed_precision, teacher_on_gpu=on_gpu,
                                      device=device, loss_chunk=cfg.memory.loss_chunk, features=features,
                                      autocast=accelerator.autocast)
                return with_generation(est, sampling_bytes(cfg, getattr(student, "config", None), micro))
            except torch.OutOfMemoryError:
                if device.type != "cuda" or rows == 1:
                    raise
                batch = None
                torch.cuda.empty_cache()
                rows //= 2

    if cfg.memory.auto_batch_size:
        choose_batch_size(cfg, probe, budget, say)
    estimate = probe(cfg.train.batch_size)
    if on_gpu and cfg.teacher.device == "auto" and device.type == "cuda":
        where, why = choose_teacher_device(estimate, budget)
        if where == "cpu":
            teacher.to("cpu")
            use_channels_last(teacher, enabled=False)
            on_gpu = False
            estimate = probe(cfg.train.batch_size)
        say(f"Teacher on the {where.upper()}: {why}")
    if device.type == "cuda":
        # The budget is for the whole process: PyTorch's allocator gets it less what lives outside
        # the allocator (CUDA context, library workspaces: 0.8 GB on an H100, bench/RESULTS.md), so
        # a run that fits the cap also fits a card of the budget's size.
        allocator = max(budget - estimate.cuda_context, budget // 4)
        torch.cuda.set_per_process_memory_fraction(min(1.0, allocator / total), cuda_index(device))
        say(f"PyTorch's allocator capped to {allocator / 1e9:.2f} GB: the budget less "
            f"{estimate.cuda_context / 1e9:.2f} GB of CUDA context")
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    say(format_estimate(estimate, budget, free))
    helps = advice(estimate, cfg, budget, student) if estimate.total > budget else []
    if helps:
        say(f"Over the budget by {fmt(estimate.total - budget)}. What would help, largest estimated saving first:")
        for text, saving in helps:
            say(f"  - {text}  (~{fmt(saving)})")
    return estimate, helps


def sampling_rate(cfg: Config, processor: Any) -> int | None:
    """The audio rate: the teacher decides (its feature extractor, or the rate a kit-exported teacher
    was trained at); data.sampling_rate must agree with it."""
    if cfg.data.modality != "audio":
        return None
    expected = getattr(processor, "sampling_rate", None)
    source = "teacher's feature extractor expects"
    if cfg.distillation.enabled and is_kit_model(cfg.teacher.model):
        expected = read_kit_config(cfg.teacher.model, "teacher.model")["sample_rate"]
        source = f"teacher {cfg.teacher.model} was trained at"
    elif not cfg.distillation.enabled and is_kit_model(cfg.student.model):  # no teacher: the pretrained student
        expected = read_kit_config(cfg.student.model, "student.model")["sample_rate"]
        source = f"student {cfg.student.model} was trained at"
    if expected and cfg.data.sampling_rate and cfg.data.sampling_rate != expected:
        raise ConfigError([f"data.sampling_rate: {cfg.data.sampling_rate} differs from the {expected} Hz the "
                           f"{source}; remove it or set it to that rate"])
    return cfg.data.sampling_rate or expected or 16000


def describe_environment(accelerator: Accelerator) -> dict[str, Any]:
    device = accelerator.device
    gpu = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "accelerate": accelerate.__version__,
        "transformers": transformers.__version__,
        "gpu_name": gpu.name if gpu else None,
        "gpu_total_bytes": gpu.total_memory if gpu else None,
        "mixed_precision": accelerator.mixed_precision,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
        "device": str(device),
    }


def _fmt_count(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"
