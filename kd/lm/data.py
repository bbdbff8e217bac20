"""Causal-LM data (data.modality: causal_lm): tokenised once through the datasets cache, with a loss mask.

A split holds one of three shapes, recognised by its columns (checked in this order):

- `messages`: chat turns [{"role": ..., "content": ...}], rendered with the tokenizer's chat template;
  the loss covers the assistant turns only.
- `prompt` + `completion`: the loss covers the completion only.
- plain text in `data.input_column`: the loss covers every token.

Every sample ends with the end-of-sequence token (so the model learns where text stops) and is cut to
`data.max_length` tokens. `data.packing: true` concatenates samples into rows of exactly max_length
tokens (no padding computed; a sample may then attend to the one before it in its row, the usual
trade of pre-training-style packing). Padding and prompt positions never count in any loss or metric.

With a remote teacher in generate mode (teacher.endpoint.mode: generate) a split holds prompts only
(`prepare_prompt_splits`): the teacher writes each answer, and kd/teachers/remote/modes.py builds the rows
prompt + answer that the student learns from.

A batch is {"inputs": {input_ids, attention_mask}, "labels": next-token ids with -100 where nothing
is learnt, "index": each row's position in its split}: labels[t] is the token at t + 1, so position t
of the logits is compared with labels[t] directly.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from kd.config import DataConfig
from kd.errors import DataError
from kd.teachers.remote.protocol import chat_prompt_ids

IGNORE = -100
FORMATS = ("messages", "prompt_completion", "text")


def lm_format(columns: list[str], cfg: DataConfig) -> str:
    """Which of the three shapes a split has (see the module docstring)."""
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if cfg.input_column in columns:
        return "text"
    raise DataError(f"{cfg.dataset}: causal_lm data needs a 'messages' column (chat), 'prompt' and 'completion' "
                    f"columns, or a text column named by data.input_column (now {cfg.input_column!r}); its columns "
                    f"are: {', '.join(columns)}")


def prepare_lm_splits(splits: dict[str, Dataset], cfg: DataConfig, tokenizer: Any) -> dict[str, Dataset]:
    """Tokenise (and with data.packing, pack) every split; columns input_ids and loss_mask."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"the tokenizer {type(tokenizer).__name__} has no end-of-sequence token; causal_lm data "
                        "needs one to end each sample")
    out = {}
    for role, ds in splits.items():
        kind = lm_format(ds.column_names, cfg)
        if kind == "messages" and not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{cfg.dataset}: the 'messages' column needs a tokenizer with a chat template, and "
                            f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has none; "
                            "use prompt/completion columns instead")
        fn = functools.partial(_tokenize_batch, kind=kind, tokenizer=tokenizer, column=cfg.input_column,
                               max_length=cfg.max_length)
        workers = min(cfg.preprocess_workers, max(1, len(ds) // 256))
        ds = ds.map(fn, batched=True, remove_columns=ds.column_names, num_proc=workers if workers > 1 else None,
                    desc=f"Tokenizing ({kind})")
        ds = ds.filter(lambda mask: [any(m) for m in mask], input_columns="loss_mask", batched=True,
                       desc="Dropping samples with nothing to learn")
        if cfg.packing:
            ds = ds.map(functools.partial(_pack_batch, length=cfg.max_length), batched=True, batch_size=2000,
                        remove_columns=ds.column_names, desc=f"Packing into rows of {cfg.max_length} tokens")
        if len(ds) == 0:
            raise DataError(f"{cfg.dataset}: no sample of the {role} split has a token to learn (all prompt or empty)")
        out[role] = ds
    return out


def prepare_prompt_splits(splits: dict[str, Dataset], cfg: DataConfig, tokenizer: Any, chat: bool,
                          budget: int, say=print) -> dict[str, Dataset]:
    """Generate mode: each sample's prompt as token ids (column input_ids, loss_mask all 0: nothing
    of a prompt is learnt), and for the chat API its messages (column `messages_json`).

    The prompt is the `messages` conversation without a final assistant turn (the teacher writes
    it), else the `prompt` column (a `completion`, if any, is ignored), else the text column. The chat API
    sends a plain prompt as one user message; the student's ids are then the chat template rendered
    with the generation prompt, as the server renders it. Prompts over `budget` tokens are left out,
    and counted (cutting one would ask the teacher to continue a mangled text)."""
    out = {}
    for role, ds in splits.items():
        kind = "prompt_completion" if "prompt" in ds.column_names and "messages" not in ds.column_names \
            else lm_format(ds.column_names, cfg)  # a prompt column alone is enough: the teacher writes the rest
        if (chat or kind == "messages") and not getattr(tokenizer, "chat_template", None):
            needs = "the chat API" if chat else "the messages column"
            raise DataError(f"{cfg.dataset}: {needs} needs a tokenizer with "
                            "a chat template, and this one has none; use teacher.endpoint.api: completions with "
                            "prompt or text columns")
        fn = functools.partial(_prompt_batch, kind=kind, tokenizer=tokenizer, column=cfg.input_column, chat=chat)
        before = len(ds)
        ds = ds.map(fn, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing prompts ({kind})")
        ds = ds.filter(lambda ids: [0 < len(x) <= budget for x in ids], input_columns="input_ids", batched=True,
                       desc="Dropping prompts over the token budget")
        if len(ds) < before:
            say(f"{role} split: {before - len(ds)} of {before} prompts are longer than {budget} tokens "
                "(data.max_length - teacher.endpoint.max_new_tokens - 1) and are left out")
        if len(ds) == 0:
            raise DataError(f"{cfg.dataset}: no prompt of the {role} split fits in {budget} tokens; raise "
                            "data.max_length or lower teacher.endpoint.max_new_tokens")
        out[role] = ds
    return out


def _prompt_batch(batch: dict[str, list], kind: str, tokenizer: Any, column: str, chat: bool) -> dict[str, list]:
    ids, masks, conversations = [], [], []
    for i in range(len(next(iter(batch.values())))):
        if kind == "messages":
            messages = list(batch["messages"][i])
            if messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        else:
            text = batch["prompt" if kind == "prompt_completion" else column][i]
            messages = [{"role": "user", "content": text}]
        tokens = chat_prompt_ids(tokenizer, messages) if chat or kind == "messages" else \
            _encode(tokenizer, messages[0]["content"])
        ids.append(list(tokens))
        masks.append([0] * len(tokens))
        conversations.append(json.dumps(messages))
    out = {"input_ids": ids, "loss_mask": masks}
    if chat:
        out["messages_json"] = conversations
    return out


def _tokenize_batch(batch: dict[str, list], kind: str, tokenizer: Any, column: str, max_length: int) -> dict[str, list]:
    ids, masks = [], []
    n = len(next(iter(batch.values())))
    for i in range(n):
        if kind == "text":
            tokens = _encode(tokenizer, batch[column][i])
            mask = [1] * len(tokens)
        elif kind == "prompt_completion":
            prompt = _encode(tokenizer, batch["prompt"][i])
            tokens = _encode(tokenizer, batch["prompt"][i] + batch["completion"][i])
            # Prompt positions carry no loss; if tokenising prompt + completion merged a token across
            # the boundary, the merged token counts as completion.
            shared = _common_prefix(prompt, tokens)
            mask = [0] * shared + [1] * (len(tokens) - shared)
        else:
            tokens, mask = _encode_chat(tokenizer, batch["messages"][i])
        tokens, mask = tokens + [tokenizer.eos_token_id], mask + [1]
        if tokens[-2:-1] == [tokenizer.eos_token_id]:  # the template already ended it
            tokens, mask = tokens[:-1], mask[:-1]
        ids.append(tokens[:max_length])
        masks.append(mask[:max_length])
    return {"input_ids": ids, "loss_mask": masks}


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The chat rendered by the tokenizer's template; mask 1 on the tokens of assistant turns.

    Each assistant turn's span is found by rendering the conversation up to it (with the generation
    prompt) and up to its end: the characters between are the turn. Tokens are mapped to characters
    with the fast tokenizer's offsets, so this works for any template."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(messages[:i + 1], tokenize=False))
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= a < e for s, e in spans)) for a, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _pack_batch(batch: dict[str, list], length: int) -> dict[str, list]:
    """Concatenate samples and cut rows of `length` tokens (the last, shorter row is kept)."""
    ids = [t for row in batch["input_ids"] for t in row]
    mask = [m for row in batch["loss_mask"] for m in row]
    starts = range(0, len(ids), length)
    return {"input_ids": [ids[s:s + length] for s in starts], "loss_mask": [mask[s:s + length] for s in starts]}


class LMCollator:
    """Right-pads a batch to its longest row and builds the shifted next-token labels."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), longest), dtype=torch.long)
        learn = torch.zeros((len(rows), longest), dtype=torch.bool)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(np.asarray(r["input_ids"]), dtype=torch.long)
            attention[i, :n] = 1
            learn[i, :n] = torch.as_tensor(np.asarray(r["loss_mask"]), dtype=torch.bool)
        # Position t predicts token t + 1: learnt where that next token is a real, masked-in one.
        labels = torch.full_like(ids, IGNORE)
        labels[:, :-1] = torch.where(learn[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))
        batch = {"inputs": {"input_ids": ids, "attention_mask": attention}, "labels": labels}
        if "sample_index" in rows[0]:
            batch["index"] = [int(r["sample_index"]) for r in rows]  # a host list, as in kd/data.py
        return batch
