"""On-policy distillation (distillation.on_policy): the student's own samples, scored by a local or a
remote teacher, learnt through the divergence on the sampled positions alone. Tiny models, runs of a
few steps in-process; the remote teacher is the kit's own server on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_students import train  # a run of a few steps in this process
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd.config import OnPolicyConfig, config_from_dict
from kd.errors import ConfigError
from kd.lm.data import IGNORE, LMCollator
from kd.lm.losses import TopK
from kd.lm.on_policy import OnPolicy, prompt_ids
from kd.objectives import NextToken
from kd.synthetic import save_tiny_llama, write_lm_dataset
from kd.teachers.remote.server import BackgroundServer, TeacherLM, build_app
from kd.teachers.remote.source import RemoteTeacher
from kd.telemetry import read_events
from kd.tui.state import RunState, summary_text


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer teacher, a 2-layer pretrained student on the same tokenizer, prompt/completion data."""
    tmp = tmp_path_factory.mktemp("onpolicy")
    return {"teacher": save_tiny_llama(tmp / "teacher"), "student": save_tiny_llama(tmp / "student", seed=1, layers=2),
            "data": write_lm_dataset(tmp / "data", "prompt_completion", {"train": 16, "validation": 4})}


@pytest.fixture(scope="module")
def tokenizer(llamas):
    return AutoTokenizer.from_pretrained(llamas["teacher"])


def lm_config(llamas: dict[str, Path], out: Path, **sections) -> dict:
    cfg = {
        "run": {"name": "on-policy", "output_dir": str(out), "seed": 0},
        "data": {"dataset": "json", "data_dir": str(llamas["data"]), "modality": "causal_lm",
                 "eval_split": "validation", "max_length": 40, "num_workers": 0},
        "teacher": {"model": str(llamas["teacher"])},
        "student": {"type": "hf", "model": str(llamas["student"])},
        "distillation": {"alpha": 0.5, "temperature": 1.0, "cache_dir": str(out / "cache"),
                         "on_policy": {"share": 0.5, "max_new_tokens": 8}},
        "train": {"batch_size": 4, "epochs": None, "max_steps": 4, "lr": 0.01, "eval_every": 100},
        "telemetry": {"log_every": 1, "warmup_steps": 0},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def steps(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir / "telemetry.jsonl") if e["type"] == "step"]


def batch_of(tokenizer, rows: list[tuple[str, str]]) -> dict:
    """A collated batch of prompt/completion rows, as the data pipeline builds it."""
    out = []
    for prompt, completion in rows:
        p = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
        assert ids[:len(p)] == p  # the prompt's tokens are not merged with the completion's
        out.append({"input_ids": ids, "loss_mask": [0] * len(p) + [1] * (len(ids) - len(p))})
    return LMCollator(tokenizer.pad_token_id)(out)


def sampler(tokenizer, share: float = 1.0, max_new_tokens: int = 8) -> OnPolicy:
    return OnPolicy(OnPolicyConfig(share=share, max_new_tokens=max_new_tokens), max_length=40, seed=0, rank=0,
                    pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)


ROWS = [("the cat", " sat on the mat"), ("a dog", " ran far"), ("birds", " sing loud songs today")]


# ---------------------------------------------------------------------------------------------
# Prompts, samples, the loss


def test_prompts_are_the_tokens_before_the_learnt_span_or_a_texts_first_tokens(tokenizer):
    batch = batch_of(tokenizer, ROWS)
    prompts = prompt_ids(batch, prompt_tokens=2, room=40)
    assert prompts == [tokenizer(p)["input_ids"] for p, _ in ROWS]
    text = LMCollator(tokenizer.pad_token_id)([{"input_ids": [5, 6, 7, 8, 9], "loss_mask": [1] * 5}])
    assert prompt_ids(text, prompt_tokens=2, room=40) == [[5, 6]]
    assert prompt_ids(text, prompt_tokens=2, room=1) == [[6]]  # cut from the left to fit the sample's room


def test_a_chats_prompt_is_the_conversation_up_to_its_last_assistant_turn(tmp_path, tokenizer):
    from datasets import load_dataset

    from kd.config import DataConfig
    from kd.lm.data import prepare_lm_splits

    folder = write_lm_dataset(tmp_path / "chat", "messages", {"train": 3})
    raw = load_dataset("json", data_dir=str(folder))["train"]
    rows = prepare_lm_splits({"train": raw}, DataConfig(dataset="json", modality="causal_lm", max_length=64),
                             tokenizer)["train"]
    batch = LMCollator(tokenizer.pad_token_id)(list(rows))
    for prompt, messages in zip(prompt_ids(batch, prompt_tokens=2, room=64), raw["messages"]):
        expected = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(prompt) == expected


def test_only_the_sampled_positions_carry_loss(llamas, tokenizer):
    student = AutoModelForCausalLM.from_pretrained(llamas["student"])
    teacher = AutoModelForCausalLM.from_pretrained(llamas["teacher"])
    batch = batch_of(tokenizer, ROWS)
    prompts = prompt_ids(batch, 32, 32)
    sampled = sampler(tokenizer, max_new_tokens=6).sample(student, batch, epoch=0, index=0)
    rows = sampled.batch
    ids, labels, attention = rows["inputs"]["input_ids"], rows["labels"], rows["inputs"]["attention_mask"]
    for r, prompt in enumerate(prompts):
        n = int(attention[r].sum())
        assert ids[r, :len(prompt)].tolist() == prompt  # the prompt, then the student's own tokens
        learnt = (labels[r] != IGNORE).nonzero().squeeze(-1).tolist()
        assert learnt == list(range(len(prompt) - 1, n - 1))  # the sample's tokens, nothing of the prompt
        assert labels[r, len(prompt) - 1:n - 1].tolist() == ids[r, len(prompt):n].tolist()
    assert sampled.generated == int(attention.sum()) - sum(map(len, prompts))

    logits = student(**rows["inputs"]).logits.detach().requires_grad_(True)
    with torch.no_grad():
        t_logits = teacher(**rows["inputs"]).logits
    cfg = config_from_dict(lm_config(llamas, Path("unused")))
    loss, parts = NextToken(cfg).loss(logits, t_logits, rows, targets=labels, alpha=0.5)
    assert set(parts) == {"total", "kd"}  # no CE on the student's own tokens
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, labels != IGNORE)  # prompt and padding positions get no gradient


def test_the_reverse_kl_on_sampled_tokens_equals_a_direct_computation(llamas, tokenizer):
    student = AutoModelForCausalLM.from_pretrained(llamas["student"])
    teacher = AutoModelForCausalLM.from_pretrained(llamas["teacher"])
    rows = sampler(tokenizer, max_new_tokens=6).sample(student, batch_of(tokenizer, ROWS), epoch=0, index=3).batch
    with torch.no_grad():
        s, t = student(**rows["inputs"]).logits, teacher(**rows["inputs"]).logits
    cfg = config_from_dict(lm_config(llamas, Path("unused"), distillation={"temperature": 2.0, "on_policy": {
        "share": 1.0, "max_new_tokens": 6}}, memory={"loss_chunk": 3}))
    loss, _ = NextToken(cfg).loss(s, t, rows, targets=rows["labels"], alpha=0.5)
    direct, count = 0.0, 0
    for r in range(s.shape[0]):
        for pos in range(s.shape[1]):
            if rows["labels"][r, pos] == IGNORE:
                continue
            q = F.softmax(s[r, pos].double() / 2.0, -1)
            p = F.softmax(t[r, pos].double() / 2.0, -1)
            direct += 4.0 * float((q * (q.log() - p.log())).sum())  # T^2 * KL(Q || P)
            count += 1
    assert float(loss) == pytest.approx(direct / count, rel=1e-5)


def test_sampling_is_seeded_by_step_and_process_and_leaves_the_global_generator_alone(llamas, tokenizer):
    student = AutoModelForCausalLM.from_pretrained(llamas["student"])
    batch = batch_of(tokenizer, ROWS)
    draw = lambda op, index: op.sample(student, batch, epoch=0, index=index).batch["inputs"]["input_ids"]  # noqa
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    first, again = draw(sampler(tokenizer), 1), draw(sampler(tokenizer), 1)
    assert torch.equal(torch.random.get_rng_state(), before)  # dropout and the rest draw as without sampling
    assert torch.equal(first, again)
    assert not torch.equal(first, draw(sampler(tokenizer), 2))
    other = OnPolicy(OnPolicyConfig(share=1.0, max_new_tokens=8), max_length=40, seed=0, rank=1,
                     pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    assert not torch.equal(first, draw(other, 1))  # a second process samples other text
    half = sampler(tokenizer, share=0.5)
    chosen = [half.chosen(0, i) for i in range(400)]
    assert 0.4 < sum(chosen) / 400 < 0.6 and chosen == [half.chosen(0, i) for i in range(400)]
    assert not any(sampler(tokenizer, share=0.0).chosen(0, i) for i in range(50))


# ---------------------------------------------------------------------------------------------
# Runs


def test_share_zero_trains_exactly_as_without_on_policy(tmp_path, llamas):
    off = lm_config(llamas, tmp_path / "off")
    del off["distillation"]["on_policy"]
    zero = lm_config(llamas, tmp_path / "zero", distillation={"on_policy": {"share": 0.0, "max_new_tokens": 8}})
    train(off), train(zero)
    for a, b in zip(steps(tmp_path / "off"), steps(tmp_path / "zero"), strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
        assert "on_policy" not in b


def test_an_on_policy_run_reports_its_samples_and_resumes_exactly(tmp_path, llamas):
    common = {"train": {"max_steps": 6, "checkpoint_every": 3, "keep_checkpoints": 5, "lr": 0.01}}
    train(lm_config(llamas, tmp_path / "full", **common))
    train(lm_config(llamas, tmp_path / "part", **common),
          resume_from=tmp_path / "full" / "checkpoints" / "step_0000003")
    full, resumed = steps(tmp_path / "full"), steps(tmp_path / "part")
    assert [e["step"] for e in resumed] == [4, 5, 6]
    shares = [e["on_policy"]["share"] for e in full]
    assert set(shares) == {0.0, 1.0}  # both kinds of batches within six steps (seed 0)
    for e in full:
        op = e["on_policy"]
        if op["share"]:
            assert e["loss"]["ce"] is None and e["loss"]["total"] == pytest.approx(e["loss"]["kd"])
            assert 1 <= op["mean_sample_tokens"] <= 8 and op["generated_tokens_per_s"] > 0 and op["score_s"] > 0
        else:
            assert e["loss"]["ce"] > 0 and op["generated_tokens"] == 0
    for a, b in zip(full[3:], resumed, strict=True):
        assert b["loss"]["total"] == pytest.approx(a["loss"]["total"], rel=1e-6, abs=1e-7), a["step"]
        assert b["on_policy"]["generated_tokens"] == a["on_policy"]["generated_tokens"]
    state = RunState()
    for event in read_events(tmp_path / "full" / "telemetry.jsonl"):
        state.apply(event)
    assert "on-policy:" in summary_text(state)


def test_a_lora_student_learns_on_policy_from_a_cache_that_serves_the_rest(tmp_path, llamas, capsys):
    cfg = lm_config(llamas, tmp_path / "run", student={"lora": {"rank": 4}},
                    distillation={"cache_top_k": 8, "on_policy": {"share": 0.5, "max_new_tokens": 8}},
                    train={"max_steps": 8})
    trainer = train(cfg)
    out = capsys.readouterr().out
    assert "it serves the off-policy batches only (50% of them): the teacher stays loaded" in out
    assert trainer.teacher is not None  # kept after the cache was filled at the first epoch's end
    events = steps(tmp_path / "run")
    assert any(e["on_policy"]["share"] for e in events)
    assert sum(e["cache"]["hits"] for e in events if "cache" in e) > 0  # later epochs' off-policy batches
    assert all(e["on_policy"]["share"] == 0 or e["cache"]["hits"] + e["cache"]["misses"] == 0 for e in events)


def test_an_out_of_memory_while_sampling_shrinks_the_micro_batch(tmp_path, llamas, monkeypatch):
    monkeypatch.setenv("KD_FAULT_OOM_AT_STEP", "1")
    monkeypatch.setenv("KD_FAULT_OOM_PHASE", "generate")
    cfg = lm_config(llamas, tmp_path / "run", distillation={"on_policy": {"share": 1.0, "max_new_tokens": 8}},
                    train={"max_steps": 2})
    train(cfg)
    events = read_events(tmp_path / "run" / "telemetry.jsonl")
    oom = next(e for e in events if e["type"] == "oom")
    assert oom["phase"] == "generate" and oom["action"] == "shrink" and oom["new_micro_batch"] == 2
    assert oom["advice"][0].startswith("distillation.on_policy.max_new_tokens below 8")


@pytest.mark.parametrize("change,fragment", [
    ({"distillation": {"on_policy": {"share": 1.5}}}, "distillation.on_policy.share: 1.5 is not allowed"),
    ({"distillation": {"on_policy": {"share": 0.5, "max_new_tokens": 39}}},
     "distillation.on_policy.max_new_tokens: 39 is not allowed; must leave room for a prompt"),
    ({"data": {"packing": True}}, "data.packing: true cannot be combined with distillation.on_policy.share"),
    ({"distillation": {"teacher_cache": "require", "cache_top_k": 8}}, "'require' never loads the teacher"),
    ({"data": {"modality": "text"}}, "on-policy distillation samples text from the student, so it needs"),
    ({"distillation": {"on_policy": {"shares": 1}}}, "did you mean distillation.on_policy.share?"),
    ({"teacher": {"endpoint": {"url": "http://127.0.0.1:1/v1", "model": "m", "mode": "generate"}}},
     "scores the student's samples in teacher.endpoint.mode: score"),
])
def test_on_policy_config_errors(tmp_path, llamas, change, fragment):
    cfg = lm_config(llamas, tmp_path / "run")
    for section, values in change.items():
        cfg.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("?", r"\?")):
        config_from_dict(cfg)


# ---------------------------------------------------------------------------------------------
# A remote teacher scores the samples


def test_the_remote_teacher_scores_sampled_ids_as_the_local_one_and_caches_them(tmp_path, llamas, tokenizer):
    student = AutoModelForCausalLM.from_pretrained(llamas["student"])
    rows = sampler(tokenizer, max_new_tokens=6).sample(student, batch_of(tokenizer, ROWS), epoch=0, index=0).batch
    teacher_lm = TeacherLM(str(llamas["teacher"]), "cpu")
    cfg = config_from_dict(lm_config(llamas, tmp_path / "run", teacher={"model": str(llamas["teacher"]), "endpoint": {
        "url": "http://127.0.0.1:1/v1", "model": "tiny", "top_k": 8, "min_top_k": 4}}))
    with BackgroundServer(build_app(teacher_lm, "tiny")) as url:
        cfg.teacher.endpoint.url = url
        remote = RemoteTeacher(cfg, tokenizer, say=lambda *a: None)
        remote.connect({})
        try:
            got = remote.score(rows)
            again = remote.score(rows)
            stats = remote.stats()
        finally:
            remote.close()
    assert stats["fetched"] == 3 and stats["cache_hits"] == 3  # the second scoring came from the answer cache
    with torch.no_grad():
        local = TopK.from_logits(teacher_lm.model(**rows["inputs"]).logits, 8)
    sampled = rows["labels"] != IGNORE
    assert torch.allclose(got.logprobs[sampled], local.logprobs[sampled], atol=1e-4)
    assert torch.equal(again.logprobs, got.logprobs)
    distinct = (local.logprobs[..., :-1] - local.logprobs[..., 1:]).abs() > 1e-5
    assert ((got.indices[..., :-1] == local.indices[..., :-1]) | ~distinct)[sampled].all()
