"""Will my language-model pair fit? Planned from the two `config.json` files alone.

`train_kd.py --config X --preflight` on a causal LM run plans here: no weights are downloaded or
loaded and no data is read. Both models are built on PyTorch's meta device (shapes without
storage), which gives exact parameter counts (tied embeddings counted once); LoRA adapters are
counted from the layers they would wrap. Activations follow from the config by formula, for a
decoder with gated MLPs under scaled-dot-product attention (no sequence x sequence matrix kept):

  per layer and token, saved for backward: 7 hidden + 2 key/value + 4 intermediate values
  (norm inputs and outputs, q/k/v, the attention output, the residual, gate, up, act(gate) x up);
  with gradient checkpointing: one hidden per layer plus one layer recomputed in full.

Logits are counted as the measured pre-flight counts them (kd/preflight.py): the student's fp32
logits and their gradient, the teacher's logits from its forward to the loss, and the chunked
loss's work tensors. A loaded run's pre-flight (on a GPU: a measured probe step) remains the
finer check; this one answers before gigabytes of weights are fetched.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from kd.config import Config
from kd.errors import ModelLoadError
from kd.lora import default_targets
from kd.preflight import ADAMW_STATE_PER_PARAM, CUDA_CONTEXT_BYTES, Estimate, choose_teacher_device, with_generation
from kd.teachers.loading import DTYPES, load_model_config


@dataclass
class Shapes:
    """What the formulas need from a decoder's config."""

    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # key/value width per token: kv heads x head dim
    vocab: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> "Shapes":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, config.hidden_size, getattr(config, "intermediate_size", None)
                   or 4 * config.hidden_size, kv * head_dim, config.vocab_size)


def generation_bytes(config: PretrainedConfig, rows: int, length: int, element: int) -> int:
    """Device memory of sampling `rows` sequences of up to `length` tokens (on-policy distillation,
    kd/lm/on_policy.py): the KV cache (keys and values of every layer and position) plus the prompt's
    forward, one layer's work at a time, and the last position's logits. Alive only while the
    student samples, not with training's activations."""
    shapes = Shapes.of(config)
    cache = 2 * shapes.layers * shapes.kv_dim * rows * length * element
    prefill = 3 * rows * length * max(shapes.intermediate, shapes.hidden) * element
    return cache + prefill + 2 * rows * shapes.vocab * 4


def sampling_bytes(cfg: Config, config: PretrainedConfig | None, micro: int) -> int:
    """The run's sampling memory at this micro-batch (0 without on-policy distillation): sequences of
    up to data.max_length tokens, the cache in 16 bits under mixed precision."""
    if cfg.data.modality != "causal_lm" or cfg.distillation.on_policy.share == 0 or config is None:
        return 0
    return generation_bytes(config, micro, cfg.data.max_length, 2 if cfg.train.mixed_precision != "no" else 4)


def meta_model(config: PretrainedConfig, what: str) -> nn.Module:
    """The architecture without storage: parameter counts and module names, no memory."""
    try:
        with torch.device("meta"), contextlib.redirect_stderr(io.StringIO()):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{what}: {config.model_type} has no causal LM class in transformers ({exc})") from None


def student_config(cfg: Config) -> tuple[PretrainedConfig, str]:
    """The student's config as training would build it, and where it came from."""
    s = cfg.student
    if s.model:
        return load_model_config(s.model, "student.model", s.revision), s.model
    spec, key = (s.config, "student.config") if s.config else (cfg.teacher.model, "teacher.model")
    config = load_model_config(spec, key, cfg.teacher.revision if key == "teacher.model" else None)
    overrides = dict(s.config_overrides)
    if s.init_from_teacher:
        layers = s.teacher_layers or list(range(0, config.num_hidden_layers, 2))
        overrides.setdefault("num_hidden_layers", len(layers))
    config.update(overrides)
    return config, f"{spec} with {overrides}" if overrides else spec


def lora_parameters(model: nn.Module, cfg: Config) -> int:
    """Parameters of rank-r adapters on the layers student.lora targets: r x (in + out) per layer."""
    lora = cfg.student.lora
    targets = lora.target_modules if lora.target_modules is not None else default_targets(model)
    output = model.get_output_embeddings()
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if targets == "all-linear" or (isinstance(targets, str) and re.fullmatch(targets, name)) or (
                isinstance(targets, list) and leaf in targets):
            total += lora.rank * (module.in_features + module.out_features)
    return total


def decoder_activations(shapes: Shapes, tokens: int, element: int, checkpointing: bool) -> int:
    """Bytes a decoder's training forward keeps for backward over `tokens` positions (see the module doc)."""
    per_layer = 7 * shapes.hidden + 2 * shapes.kv_dim + 4 * shapes.intermediate
    if checkpointing:
        kept = shapes.layers * shapes.hidden + per_layer
    else:
        kept = shapes.layers * per_layer
    return tokens * (kept + 2 * shapes.hidden) * element  # + embeddings output and final norm


@dataclass
class Plan:
    estimate: Estimate
    teacher_where: str  # "gpu", "cpu", or why there is none in memory ("cache", "remote", "none")
    student_parameters: int
    trainable: int
    teacher_parameters: int | None
    student_source: str


def plan_from_configs(cfg: Config) -> Plan:
    """The memory of a causal LM run from the models' configs (see the module doc)."""
    s_config, source = student_config(cfg)
    student = meta_model(s_config, "student")
    n_student = sum(p.numel() for p in student.parameters())
    trainable = lora_parameters(student, cfg) if cfg.student.lora is not None else n_student
    shapes = Shapes.of(s_config)
    micro, length = cfg.train.batch_size, cfg.data.max_length
    tokens = micro * length
    mixed = cfg.train.mixed_precision != "no"
    student_act = decoder_activations(shapes, tokens, 2 if mixed else 4, cfg.student.gradient_checkpointing)
    # Frozen weights under LoRA stay in fp32 as the student loads; the adapters add their r-wide activations
    # (small next to the rest) and their own weights.
    student_weights = (n_student + (trainable if cfg.student.lora is not None else 0)) * 4

    dist = cfg.distillation
    online = dist.enabled and not cfg.remote_teacher and dist.teacher_cache != "require"
    teacher_params, teacher_weights, teacher_act, where = None, 0, 0, "none"
    if dist.enabled and cfg.remote_teacher:
        where = "remote"
    elif dist.enabled and not online:
        where = "cache"
    if online:
        t_config = load_model_config(cfg.teacher.model, "teacher.model", cfg.teacher.revision)
        teacher = meta_model(t_config, "teacher.model")
        teacher_params = sum(p.numel() for p in teacher.parameters())
        t_shapes = Shapes.of(t_config)
        t_element = DTYPES[cfg.teacher.dtype].itemsize
        teacher_weights = teacher_params * t_element
        # Inference keeps a layer's input and output alive, not the graph: 3x its largest tensor.
        teacher_act = 3 * tokens * max(2 * t_shapes.intermediate, t_shapes.vocab) * t_element
        where = "cpu" if cfg.teacher.device == "cpu" else "gpu"
    vocab = shapes.vocab
    loss_work = 6 * min(cfg.memory.loss_chunk, tokens) * vocab * 4
    logits = length * vocab * 4 * micro * ((where == "gpu" or where == "cpu") + 2) + loss_work
    teacher_extra = max(0, teacher_act - student_act)

    def estimate(on_gpu: bool) -> Estimate:
        parts = {"teacher_weights": teacher_weights if on_gpu else 0, "student_weights": student_weights,
                 "grads": trainable * 4, "optimizer": trainable * ADAMW_STATE_PER_PARAM,
                 "activations": student_act + (teacher_extra if on_gpu else 0), "cuda_context": CUDA_CONTEXT_BYTES,
                 "logits": logits}
        est = Estimate(**parts, total=sum(parts.values()), teacher_activations=teacher_extra if on_gpu else 0,
                       method="from configs", loss_work=loss_work)
        return with_generation(est, sampling_bytes(cfg, s_config, micro))

    plan = estimate(where == "gpu")
    if where == "gpu" and cfg.teacher.device == "auto":
        where, _ = choose_teacher_device(plan, int(cfg.memory.vram_budget_gb * 1e9))
        plan = estimate(where == "gpu")
    return Plan(plan, where, n_student, trainable, teacher_params, source)


def describe(plan: Plan, cfg: Config) -> str:
    """What was planned and how, before the estimate's table."""
    teacher = {"gpu": "on the GPU", "cpu": "on the CPU (teacher.device)", "cache": "not in memory (teacher cache)",
               "remote": "behind teacher.endpoint", "none": "none (distillation off)"}[plan.teacher_where]
    count = f"{plan.teacher_parameters / 1e9:.2f}B parameters, " if plan.teacher_parameters else ""
    lora = (f", LoRA rank {cfg.student.lora.rank}: {plan.trainable / 1e6:.2f}M trainable"
            if cfg.student.lora is not None else ", every weight trains")
    return (f"Planned from the models' config.json files alone (no weights downloaded or loaded, no data read):\n"
            f"  student {plan.student_source}: {plan.student_parameters / 1e9:.3f}B parameters{lora}\n"
            f"  teacher {cfg.teacher.model or '-'}: {count}{teacher}\n"
            f"  micro-batch {cfg.train.batch_size} x {cfg.data.max_length} tokens, precision "
            f"{cfg.train.mixed_precision}, gradient checkpointing "
            f"{'on' if cfg.student.gradient_checkpointing else 'off'}")
