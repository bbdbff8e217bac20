"""LoRA students: low-rank adapters on a pretrained transformers student (PEFT).

A pretrained 0.5B student fully fine-tuned in fp32 AdamW needs 16 bytes per parameter (weights,
gradients, two moments): 8 GB before activations, more than a 5.5 GB card. With adapters of rank r
on the attention projections, only the adapters (and a classifier's new head) have gradients and
optimizer state, a few percent of the model; the frozen weights cost their 4 bytes each.

The adapters train wrapped in PEFT's PeftModel; the exported student is merged back into plain
weights (loadable with the Auto classes, no PEFT needed) with the adapter saved beside it
(kd/export/student.py).
"""

from __future__ import annotations

import logging

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from kd.config import LoraConfig
from kd.errors import ModelLoadError

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # inside the exported student folder
# Query/value projection names across transformers architectures that PEFT's table does not list
# (ViT and AST: query/value; wav2vec2: q_proj/v_proj; DistilBERT: q_lin/v_lin; T5-style: q/v).
ATTENTION_PAIRS = (("q_proj", "v_proj"), ("query", "value"), ("q_lin", "v_lin"), ("q", "v"))


def add_lora(model: nn.Module, cfg: LoraConfig, classifier: bool) -> tuple[PeftModel, str]:
    """Wrap `model` with adapters as `cfg` says; every other weight is frozen. A classifier's head
    (new for the data's labels) trains fully unless `cfg.modules_to_save` says otherwise. Returns the
    wrapped model and a line saying what trains."""
    targets = cfg.target_modules if cfg.target_modules is not None else default_targets(model)
    to_save = cfg.modules_to_save if cfg.modules_to_save is not None else (head_modules(model) if classifier else [])
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if isinstance(targets, list):
        missing = [t for t in targets if t not in names and not any(n.endswith(t) for n in names)]
        if missing:
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ModelLoadError(f"student.lora.target_modules: {', '.join(missing)} not in the "
                                 f"{type(model).__name__}; its linear layers are named {', '.join(linear)}")
    config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                            modules_to_save=to_save or None, bias="none")
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:  # PEFT's own message names what it could not match
        raise ModelLoadError(f"student.lora: {str(exc).splitlines()[0]}") from None
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    return wrapped, (f"LoRA: rank {cfg.rank}, alpha {cfg.alpha:g} on {describe_targets(targets)}"
                     + (f", {', '.join(to_save)} trained fully" if to_save else "")
                     + f": {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")


def default_targets(model: nn.Module) -> list[str] | str:
    """The architecture's usual LoRA targets: PEFT's table by model type, else the query and value
    projections by their common names, else every linear layer but the output head."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in ATTENTION_PAIRS:
        if set(pair) <= linear:
            return list(pair)
    return "all-linear"


def head_modules(model: nn.Module) -> list[str]:
    """A transformers classifier's modules outside its base model (classifier, projector, pooler
    head...): the layers that map features to the data's labels, trained fully beside the adapters."""
    base = getattr(model, "base_model_prefix", None)
    return [name for name, child in model.named_children()
            if name != base and any(True for _ in child.parameters())]


def describe_targets(targets: list[str] | str) -> str:
    return targets if isinstance(targets, str) else ", ".join(targets)


def is_lora(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
