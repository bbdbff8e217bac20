"""Token-level distillation compares two next-token distributions id by id: one vocabulary, checked first.

A teacher and a student with different tokenizers give logits whose ids mean different strings;
training on them runs without error and learns nothing useful (users meet this mid-run: TRL #3028,
DistillKit #7/#12). So before anything trains, the two tokenizers are compared on their size, their
special tokens and every id -> string mapping; a mismatch is one error naming both models and the
first differing tokens.

Logit widths may differ: published models pad their output layer past the tokenizer (Qwen2.5-7B
has 152,064 logits, 0.5B 151,936, for one tokenizer of 151,665 entries; torchtune #2119). Rows past
the tokenizer are no token at all, so both models' logits are cut to the tokenizer's length where
they come out (`cut_to_tokenizer`), and the loss, the teacher's top k and evaluation all see the
shared range. A width below the tokenizer's length is refused: some tokens would have no logit.
"""

from __future__ import annotations

from typing import Any

import torch

from kd.errors import ModelLoadError

SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


def vocabulary_differences(teacher_tok: Any, student_tok: Any, limit: int = 3) -> list[str]:
    """What differs between two tokenizers (empty: they are the same vocabulary)."""
    found: list[str] = []
    t_size, s_size = len(teacher_tok), len(student_tok)
    if t_size != s_size:
        found.append(f"vocabulary size {t_size} vs {s_size}")
    for name in SPECIAL:
        a, b = getattr(teacher_tok, name, None), getattr(student_tok, name, None)
        if a is not None and b is not None and (str(a), teacher_tok.convert_tokens_to_ids(str(a))) != (
                str(b), student_tok.convert_tokens_to_ids(str(b))):
            found.append(f"{name} {str(a)!r} (id {teacher_tok.convert_tokens_to_ids(str(a))}) vs {str(b)!r} "
                         f"(id {student_tok.convert_tokens_to_ids(str(b))})")
    t_ids = teacher_tok.convert_ids_to_tokens(list(range(min(t_size, s_size))))
    s_ids = student_tok.convert_ids_to_tokens(list(range(min(t_size, s_size))))
    differing = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(t_ids, s_ids)) if a != b]
    if differing:
        more = f" (and {len(differing) - limit} more)" if len(differing) > limit else ""
        found.append("first differing token ids " + ", ".join(differing[:limit]) + more)
    return found


def check_shared_vocabulary(teacher_tok: Any, student_tok: Any | None, *, teacher_width: int, student_width: int,
                            teacher_name: str, student_name: str) -> None:
    """Raise ModelLoadError unless teacher and student share one tokenizer whose every id both models'
    logits cover (the widths may differ by padding).

    `student_tok` None: the student has no tokenizer of its own (it reads the teacher's tokens)."""
    found = vocabulary_differences(teacher_tok, student_tok) if student_tok is not None else []
    if found:
        raise ModelLoadError(
            f"teacher {teacher_name} and student {student_name} do not share a vocabulary ({'; '.join(found)}); "
            "token-level KD compares their next-token distributions id by id, so both need the same tokenizer: "
            "take a student of the teacher's family, or build it from the teacher's config (leave student.config "
            "empty and shrink it with student.config_overrides)")
    size = len(teacher_tok)
    for name, width in ((f"teacher {teacher_name}", teacher_width), (f"student {student_name}", student_width)):
        if width < size:
            raise ModelLoadError(f"{name} has logits over {width} token ids (config.vocab_size) but the shared "
                                 f"tokenizer has {size}: tokens past {width} would have no logit; use a model built "
                                 "for this tokenizer")


def cut_to_tokenizer(model: torch.nn.Module, size: int) -> str | None:
    """Cut a causal LM's logits to the tokenizer's `size` ids as they leave its forward (a forward
    hook, so training, evaluation, the teacher cache and generation all see the same range). What
    was cut, for the run's output (None: no padding, nothing to cut)."""
    if model.config.vocab_size <= size:
        return None

    def cut(module: torch.nn.Module, args: Any, output: Any) -> Any:
        output.logits = output.logits[..., :size]
        return output

    model.register_forward_hook(cut)
    return (f"logits cut to the tokenizer's {size} ids (config.vocab_size {model.config.vocab_size}: "
            "the rest is padding)")
