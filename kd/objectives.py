"""What the student learns from a batch and how a split is scored: class labels or next tokens.

The fit loop is the same for both; it asks its objective for the loss of a micro-batch, for the
units throughput counts (samples, or tokens for language models) and for a scorer that turns a
split's batches into the eval event's metrics.

- `Classification`: (1 - alpha) * CE + alpha * T^2 * KL per sample (kd/losses.py); metrics: student
  accuracy and macro F1, teacher accuracy, student/teacher agreement, loss.
- `NextToken` (data.modality: causal_lm): the same mix per learnt token, with forward KL, reverse KL
  or generalised JSD, computed in chunks of positions (kd/lm/losses.py); metrics: next-token
  accuracy and agreement with the teacher, per-token loss, perplexity of student and teacher.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import Accelerator

from kd.config import Config
from kd.lm.losses import IGNORE, token_distillation_loss, token_eval_sums, token_loss_sums
from kd.losses import distillation_loss, per_sample_losses
from kd.metrics import split_metrics


class Classification:
    unit = "samples"

    def __init__(self, cfg: Config, num_classes: int):
        self.temperature = cfg.distillation.temperature
        self.num_classes = num_classes

    def loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor | None, batch: dict[str, Any], *,
             targets: torch.Tensor, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return distillation_loss(s_logits, t_logits, targets, alpha=alpha, temperature=self.temperature,
                                 sample_weight=batch.get("sample_weight"))

    def tokens(self, batch: dict[str, Any]) -> torch.Tensor | None:
        return None

    def scorer(self, accelerator: Accelerator, with_teacher: bool, alpha: float) -> "ClassificationScorer":
        return ClassificationScorer(accelerator, self.num_classes, with_teacher, alpha=alpha,
                                    temperature=self.temperature)


class ClassificationScorer:
    def __init__(self, accelerator: Accelerator, num_classes: int, with_teacher: bool, *, alpha: float,
                 temperature: float):
        self.acc, self.num_classes, self.with_teacher = accelerator, num_classes, with_teacher
        self.alpha, self.temperature = alpha, temperature
        self.preds: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.t_preds: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []

    def add(self, s_logits: torch.Tensor, t_logits: torch.Tensor | None, batch: dict[str, Any]) -> None:
        loss = per_sample_losses(s_logits, t_logits, batch["labels"], alpha=self.alpha,
                                 temperature=self.temperature)["total"]
        t_pred = t_logits.argmax(-1).to(s_logits.device) if t_logits is not None else torch.zeros_like(batch["labels"])
        gathered = self.acc.gather_for_metrics((s_logits.argmax(-1), batch["labels"], t_pred, loss))
        for bucket, value in zip((self.preds, self.labels, self.t_preds, self.losses), gathered):
            bucket.append(value.cpu())

    def samples(self) -> int:
        return sum(x.numel() for x in self.labels)

    def metrics(self) -> dict[str, Any]:
        return split_metrics(torch.cat(self.preds), torch.cat(self.labels), self.num_classes,
                             teacher_pred=torch.cat(self.t_preds) if self.with_teacher else None,
                             loss=float(torch.cat(self.losses).float().mean()))


class NextToken:
    unit = "tokens"

    def __init__(self, cfg: Config):
        dist = cfg.distillation
        self.kind, self.beta, self.temperature = dist.divergence, dist.jsd_beta, dist.temperature
        self.on_policy_kind = dist.on_policy.divergence
        self.chunk = cfg.memory.loss_chunk

    def loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor | None, batch: dict[str, Any], *,
             targets: torch.Tensor, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.get("on_policy"):
            # The student's own samples (kd/lm/on_policy.py): the divergence alone over the sampled
            # positions; their tokens are no CE target, so the parts carry no ce.
            _, kd_sum, count = token_loss_sums(s_logits, t_logits, None, targets != IGNORE, kind=self.on_policy_kind,
                                               beta=self.beta, temperature=self.temperature, chunk_size=self.chunk)
            kd = kd_sum / count.clamp_min(1).float()
            return kd, {"total": kd, "kd": kd}
        return token_distillation_loss(s_logits, t_logits, targets, alpha=alpha, kind=self.kind, beta=self.beta,
                                       temperature=self.temperature,
                                       chunk_size=self.chunk)

    def tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """Tokens the models read in this micro-batch (padding excluded), kept on the device."""
        return batch["inputs"]["attention_mask"].sum()

    def scorer(self, accelerator: Accelerator, with_teacher: bool, alpha: float) -> "NextTokenScorer":
        return NextTokenScorer(accelerator, with_teacher, alpha, self)


class NextTokenScorer:
    """Sums over every learnt token of the split, from per-row sums gathered across processes."""

    NAMES = ("nll", "correct", "teacher_nll", "teacher_correct", "agree", "kd", "count")

    def __init__(self, accelerator: Accelerator, with_teacher: bool, alpha: float, objective: NextToken):
        self.acc, self.with_teacher, self.alpha, self.objective = accelerator, with_teacher, alpha, objective
        self.sums = dict.fromkeys(self.NAMES, 0.0)
        self.rows = 0

    def add(self, s_logits: torch.Tensor, t_logits: torch.Tensor | None, batch: dict[str, Any]) -> None:
        o = self.objective
        per_row = token_eval_sums(s_logits, t_logits, batch["labels"], kind=o.kind, beta=o.beta,
                                  temperature=o.temperature, chunk_size=o.chunk)
        gathered = self.acc.gather_for_metrics(tuple(per_row[name] for name in self.NAMES))
        for name, value in zip(self.NAMES, gathered):
            self.sums[name] += float(value.double().sum())
        self.rows += gathered[0].numel()

    def samples(self) -> int:
        return self.rows

    def metrics(self) -> dict[str, Any]:
        n, sums, teacher = max(1.0, self.sums["count"]), self.sums, self.with_teacher
        ce, kd = sums["nll"] / n, sums["kd"] / n
        return {
            "student_acc": sums["correct"] / n,  # next-token top-1 accuracy on the learnt positions
            "student_f1": None,
            "teacher_acc": sums["teacher_correct"] / n if teacher else None,
            "agreement": sums["agree"] / n if teacher else None,  # student and teacher top-1 tokens agree
            "loss": (1.0 - self.alpha) * ce + self.alpha * kd if teacher else ce,  # per token, as trained
            "ce": ce,
            "perplexity": _exp(ce),
            "teacher_perplexity": _exp(sums["teacher_nll"] / n) if teacher else None,
            "tokens": int(sums["count"]),
        }


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def make_objective(cfg: Config, num_classes: int) -> Classification | NextToken:
    return NextToken(cfg) if cfg.data.modality == "causal_lm" else Classification(cfg, num_classes)
