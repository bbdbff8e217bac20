"""A remote teacher (teacher.endpoint) against the kit's own server on 127.0.0.1: the soft targets
equal the local teacher's, faults drive the retry policy, answers are cached and reused, the key
never reaches the run folder, and a run that failed on the server resumes without refetching."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from starlette.responses import JSONResponse, PlainTextResponse

from kd.config import EndpointConfig, config_from_dict, load_config
from kd.lm.losses import TopK
from kd.synthetic import save_tiny_llama, save_tiny_tokenizer, write_lm_dataset
from kd.teachers.remote.client import EndpointClient, RemoteTeacherError, retry_after_s
from kd.teachers.remote.protocol import ProtocolError, TokenMap, check_alignment
from kd.teachers.remote.server import BackgroundServer, TeacherLM, build_app
from kd.teachers.remote.source import RemoteTeacher
from kd.telemetry import read_events

from conftest import ROOT, run_cli, write_config

KEY = "sk-test-1234567890-secret"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def teacher_lm(llama) -> TeacherLM:
    return TeacherLM(str(llama), "cpu")


class Faults:
    """ASGI middleware in front of the teacher server: /v1/completions answers follow `script`
    (None: the real answer), counting requests and the most in flight at once. `outage` (after,
    seconds): once `after` completions were answered, every completion fails with HTTP 500 for that
    long, whichever requests arrive (a script assigns failures by arrival order, which concurrent
    requests and their retries make a matter of timing)."""

    def __init__(self, app, script=(), delay_s: float = 0.0, outage: tuple[int, float] | None = None):
        self.app, self.script, self.delay_s, self.outage = app, list(script), delay_s, outage
        self.completions = self.active = self.max_active = 0
        self.down_since: float | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await self.app(scope, receive, send)
        self.completions += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            fault = self.script.pop(0) if self.script else None
            if self.outage is not None and self.completions > self.outage[0]:
                self.down_since = self.down_since or time.monotonic()
                fault = 500 if time.monotonic() - self.down_since < self.outage[1] else fault
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if fault is None:
                return await self.app(scope, receive, send)
            if fault == "hang":
                await asyncio.sleep(2.0)
                return await self.app(scope, receive, send)
            if fault == "garbage":
                return await PlainTextResponse('{"choices": [', status_code=200)(scope, receive, send)
            status, headers = (fault, {}) if isinstance(fault, int) else (fault[0], fault[1])
            body = {"error": {"message": f"injected {status}", "type": "Injected", "code": status}}
            return await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)
        finally:
            self.active -= 1


def endpoint(url: str, **kw) -> EndpointConfig:
    values = {"url": url, "model": "tiny", "top_k": 5, "min_top_k": 3, "max_retries": 3, "backoff_s": 0.01,
              "max_backoff_s": 0.05, "timeout_s": 5.0}
    values.update(kw)
    return EndpointConfig(**values)


def answered(remote: RemoteTeacher, batch: dict, rows: list[dict]) -> dict:
    """The batch as the training loop receives it from the remote teacher (rows announced as the
    loader's sampler would)."""
    return next(iter(remote.prefetch([batch], iter([rows]))))


def score_body(k: int) -> dict:
    return {"model": "tiny", "prompt": [5, 6, 7], "echo": True, "logprobs": k, "max_tokens": 1, "temperature": 0}


# ---------------------------------------------------------------------------------------------
# Wire format


def test_token_map_detects_ids_strings_and_a_foreign_tokenizer(tmp_path, teacher_lm):
    tok = teacher_lm.tokenizer
    ids = tok("the cat sat on the mat")["input_ids"]
    tm = TokenMap(tok)
    assert tm.detect([f"token_id:{i}" for i in ids], ids) == "ids"
    assert tm.detect(tok.convert_ids_to_tokens(ids), ids) == "tokens"
    foreign = save_tiny_tokenizer(tmp_path / "other", seed=1, vocab_size=200)
    with pytest.raises(ProtocolError, match="do not map back to the student's token ids.*same tokenizer"):
        tm.detect(foreign.convert_ids_to_tokens(foreign("the cat sat on the mat")["input_ids"]), ids)


def test_token_strings_several_ids_write_alike_are_resolved_or_left_out(teacher_lm):
    tok = teacher_lm.tokenizer
    text = "naïve café"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    written = [tok.decode([i]) for i in ids]  # how a server without token ids writes them
    assert written.count("\ufffd") == 4  # the byte halves of ï and é, each written as U+FFFD
    tm = TokenMap(tok, "text")
    assert tm.answer_ids(written, text) == ids  # resolved from the answer's text
    assert tm.detect(written, ids) == "text"  # score mode knows the ids it sent
    with pytest.raises(ProtocolError, match="tokenises differently.*token ids"):
        tm.answer_ids(written, "naive cafe")
    top_ids, top_lps = tm.top([{"\ufffd": -0.1, "a": -2.0, "e": -3.0}], k=3)
    assert top_ids.tolist() == [[tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("e")]]  # U+FFFD left out
    assert top_lps.tolist() == [[-2.0, -3.0]]


def test_alignment_check_refuses_shifted_echo_logprobs():
    tokens = ["a", "b", "c", "d"]
    values = [None, -1.0, -2.0, -3.0]
    aligned = [None, {"b": -1.0, "x": -0.5}, {"c": -2.0, "x": -0.1}, {"d": -3.0}]
    check_alignment(tokens, values, aligned)
    shifted = [None, {"c": -2.0, "b": -0.7}, {"d": -3.0, "c": -0.2}, {"x": -1.0}]  # entry i describes token i + 1
    with pytest.raises(ProtocolError, match="not aligned.*cannot score"):
        check_alignment(tokens, values, shifted)


def test_retry_after_accepts_seconds_and_dates():
    assert retry_after_s("2") == 2.0 and retry_after_s(None) is None and retry_after_s("soon") is None
    from email.utils import formatdate

    assert 1.0 < retry_after_s(formatdate(time.time() + 3, usegmt=True)) <= 3.0


# ---------------------------------------------------------------------------------------------
# The same soft targets as the local teacher


def score_setup(tmp_path: Path, llama: Path, tok, **endpoint_kw):
    """A config pointing at a server filled in later, and a batch of three text rows with its rows."""
    data = write_lm_dataset(tmp_path / "data", "text", {"train": 4, "validation": 2})
    ep = {"url": "http://127.0.0.1:1/v1", "model": "tiny", "top_k": 8, "min_top_k": 4, **endpoint_kw}
    cfg = config_from_dict({
        "data": {"dataset": "json", "data_dir": str(data), "modality": "causal_lm", "input_column": "text"},
        "teacher": {"model": str(llama), "endpoint": ep},
        "student": {"type": "hf"}, "distillation": {"cache_dir": str(tmp_path / "cache")}})
    rows = [tok(t)["input_ids"] for t in ("the cat sat on the mat", "a dog ran", "birds sing loud songs today")]
    longest = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (longest - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
    labels = torch.where(mask.roll(-1, 1).bool(), ids.roll(-1, 1), torch.full_like(ids, -100))
    labels[:, -1] = -100
    batch = {"inputs": {"input_ids": ids, "attention_mask": mask}, "labels": labels}
    return cfg, batch, [{"input_ids": r} for r in rows]


def test_remote_scores_equal_the_local_teachers_top_k(tmp_path, llama, teacher_lm):
    cfg, batch, rows = score_setup(tmp_path, llama, teacher_lm.tokenizer)
    ids, mask, labels = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"], batch["labels"]
    with BackgroundServer(build_app(teacher_lm, "tiny")) as url:
        cfg.teacher.endpoint.url = url
        remote = RemoteTeacher(cfg, teacher_lm.tokenizer, say=lambda *a: None)
        remote.connect({})  # no splits: the server is up here
        try:
            got = answered(remote, batch, rows)["soft_targets"]
        finally:
            remote.close()
    with torch.no_grad():
        local = TopK.from_logits(teacher_lm.model(input_ids=ids, attention_mask=mask).logits, 8)
    learnt = labels != -100
    assert torch.allclose(got.logprobs[learnt], local.logprobs[learnt], atol=1e-4)
    # ids agree wherever neighbouring values are not tied within float noise
    distinct = (local.logprobs[..., :-1] - local.logprobs[..., 1:]).abs() > 1e-5
    same = (got.indices[..., :-1] == local.indices[..., :-1]) | ~distinct
    assert same[learnt].all()


def test_equal_log_probabilities_list_the_lower_id_first(teacher_lm):
    # bf16 servers tie the top two at some positions; vLLM and torch.argmax pick the lower id there.
    tokens = TokenMap(teacher_lm.tokenizer)
    tokens.kind = "ids"
    ids, lps = tokens.top([{"token_id:7": -0.5, "token_id:3": -0.5, "token_id:9": -1.0, "token_id:5": -0.5}], 3)
    assert ids.tolist() == [[3, 5, 7]] and lps.tolist() == [[-0.5, -0.5, -0.5]]


def test_the_probe_measures_the_server_against_the_local_teacher(tmp_path, llama, teacher_lm):
    """Where the teacher's weights are at hand, the probe's answer is compared with them: an fp32 server
    agrees to float noise; one holding other weights (or computing in another precision) is named."""
    cfg, _, _ = score_setup(tmp_path, llama, teacher_lm.tokenizer)
    other = TeacherLM(str(save_tiny_llama(tmp_path / "other", seed=1)), "cpu")
    for server, fine in ((teacher_lm, True), (other, False)):
        lines: list[str] = []
        with BackgroundServer(build_app(server, "tiny")) as url:
            cfg.teacher.endpoint.url = url
            remote = RemoteTeacher(cfg, teacher_lm.tokenizer, say=lines.append, local_teacher=lambda: teacher_lm.model)
            try:
                remote.connect({})
            finally:
                remote.close()
        a = remote.agreement
        line = next(ln for ln in lines if ln.startswith("Remote teacher against the local one"))
        assert a["positions"] > 5 and remote.describe()["agreement"] == a
        if fine:
            assert a["top1_agree"] == a["positions"] and a["max_logprob_diff"] < 1e-3
            assert "precision noise" not in line
        else:
            assert a["max_logprob_diff"] > 0.01
            assert "more than precision noise" in line and "teacher.endpoint.precision" in line


def test_the_named_precision_is_part_of_the_answer_key(tmp_path, llama, teacher_lm):
    cfg, batch, rows = score_setup(tmp_path, llama, teacher_lm.tokenizer)
    faults = Faults(build_app(teacher_lm, "tiny"))
    asked = []
    with BackgroundServer(faults) as url:
        cfg.teacher.endpoint.url = url
        for precision in ("bf16", "bf16", "fp32", None):
            cfg.teacher.endpoint.precision = precision
            before = faults.completions
            remote = RemoteTeacher(cfg, teacher_lm.tokenizer, say=lambda *a: None)
            try:
                remote.connect({})
                answered(remote, batch, rows)
                assert remote.describe()["precision"] == precision
            finally:
                remote.close()
            asked.append(faults.completions - before - 1)  # less the probe
    assert asked == [3, 0, 3, 3]  # the same precision reads the cache; another one asks again


def test_retries_are_reported_as_warnings_while_training_waits(tmp_path, llama, teacher_lm, monkeypatch):
    import kd.teachers.remote.source as source

    monkeypatch.setattr(source, "WATCH_S", 0.05)
    cfg, batch, rows = score_setup(tmp_path, llama, teacher_lm.tokenizer, max_retries=6, backoff_s=0.1,
                                   max_backoff_s=0.2)
    faults = Faults(build_app(teacher_lm, "tiny"), [None] + [500] * 4)  # the probe, then 4 failures
    warnings: list[tuple[str, str]] = []
    with BackgroundServer(faults) as url:
        cfg.teacher.endpoint.url = url
        remote = RemoteTeacher(cfg, teacher_lm.tokenizer, say=lambda *a: None)
        try:
            remote.connect({})
            remote.report_to(lambda code, message: warnings.append((code, message)))
            answered(remote, batch, rows)
        finally:
            remote.close()
    assert warnings and {code for code, _ in warnings} == {"teacher_retrying"}
    assert all("HTTP 500" in message and "failed tries while training waits" in message for _, message in warnings)
    # Each warning counts the tries failed since the one before; those just before the answer came go unsaid.
    assert 1 <= sum(int(message.split(": ")[1].split(" ")[0]) for _, message in warnings) <= 4


class RefuseTokenIds:
    """A server that rejects vLLM's return_tokens_as_token_ids as OpenAI's API does (HTTP 400)."""

    def __init__(self, app):
        self.app, self.refused = app, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        if b"return_tokens_as_token_ids" in body:
            self.refused += 1
            answer = {"error": {"message": "Unrecognized request argument supplied: return_tokens_as_token_ids",
                                "type": "invalid_request_error"}}
            return await JSONResponse(answer, status_code=400)(scope, receive, send)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def prompt_batch(tok, prompts: list[str], chat: bool, max_new_tokens: int) -> tuple[dict, list[dict]]:
    """The prompt rows generate mode trains from (kd/lm/data.py) and their collated batch."""
    from datasets import Dataset

    from kd.config import DataConfig
    from kd.lm.data import LMCollator, prepare_prompt_splits

    ds = Dataset.from_dict({"prompt": prompts, "completion": ["ignored"] * len(prompts)})
    cfg = DataConfig(dataset="json", modality="causal_lm", max_length=48)
    split = prepare_prompt_splits({"train": ds}, cfg, tok, chat=chat, budget=48 - max_new_tokens - 1,
                                  say=lambda *a: None)["train"]
    rows = [split[i] for i in range(len(split))]
    return LMCollator(tok.pad_token_id)(rows), rows


@pytest.mark.parametrize("api", ["completions", "chat", "chat-token-strings"])
def test_generate_mode_trains_on_the_teachers_answer_with_its_top_k(llama, teacher_lm, tmp_path, api):
    tok = teacher_lm.tokenizer
    chat = api.startswith("chat")
    cfg = config_from_dict({
        "data": {"dataset": "json", "data_dir": "x", "modality": "causal_lm", "max_length": 48},
        "teacher": {"model": str(llama), "endpoint": {"url": "http://127.0.0.1:1/v1", "model": "tiny", "top_k": 8,
                                                      "min_top_k": 4, "mode": "generate", "max_new_tokens": 6,
                                                      "api": "chat" if chat else "completions"}},
        "student": {"type": "hf"}, "distillation": {"cache_dir": str(tmp_path / "cache")}})
    batch, rows = prompt_batch(tok, ["finish: the cat", "a dog", "birds sing loud"], chat, max_new_tokens=6)
    app = build_app(teacher_lm, "tiny")
    server = RefuseTokenIds(app) if api == "chat-token-strings" else app
    with BackgroundServer(server) as url:
        cfg.teacher.endpoint.url = url
        remote = RemoteTeacher(cfg, tok, say=lambda *a: None)
        remote.connect({})  # no splits: the server is up here
        try:
            got = answered(remote, batch, rows)
        finally:
            remote.close()
    if api == "chat-token-strings":
        assert server.refused == 1 and remote.mode.as_ids is False and remote.tokens.kind != "ids"
    ids, mask, labels = got["inputs"]["input_ids"], got["inputs"]["attention_mask"], got["labels"]
    for r, row in enumerate(rows):
        prompt, seq = list(row["input_ids"]), ids[r][mask[r].bool()].tolist()
        with torch.no_grad():
            greedy = teacher_lm.model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                               pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
        if tok.eos_token_id in greedy:
            greedy = greedy[:greedy.index(tok.eos_token_id) + 1]  # the end token closes the row
        assert seq == prompt + greedy  # the row is the prompt and the teacher's own (greedy) answer
        p = len(prompt)
        assert (labels[r, :p - 1] == -100).all() and labels[r, p - 1:len(seq) - 1].tolist() == greedy
        assert (labels[r, len(seq) - 1:] == -100).all()
    # At every answer position the soft targets are the local teacher's log-probabilities of that same
    # row, for ids among its top k.
    with torch.no_grad():
        logp = torch.log_softmax(teacher_lm.model(input_ids=ids, attention_mask=mask).logits, -1)
    local = TopK(*reversed(logp.topk(8, dim=-1)))
    learnt = labels != -100  # the kit's server lists the stop token's distribution too, as vLLM does
    top = got["soft_targets"]
    assert learnt.sum() >= 6
    assert torch.allclose(top.logprobs[learnt], logp.gather(-1, top.indices)[learnt], atol=1e-4)
    assert (top.logprobs[learnt] >= local.logprobs[learnt][:, -1:] - 1e-4).all()
    if api == "chat-token-strings":  # strings several ids write alike (U+FFFD halves) are left out
        assert 1 <= top.indices.shape[-1] <= 8
    else:  # token ids: exactly the local top 8 (ids wherever neighbouring values are not tied)
        assert top.indices.shape[-1] == 8
        distinct = (local.logprobs[..., :-1] - local.logprobs[..., 1:]).abs() > 1e-5
        assert ((top.indices[..., :-1] == local.indices[..., :-1]) | ~distinct)[learnt].all()


def test_an_answer_that_stopped_ends_with_the_end_token(teacher_lm):
    from kd.teachers.remote.modes import Generate
    from kd.teachers.remote.protocol import Scored

    tok = teacher_lm.tokenizer
    mode = Generate(EndpointConfig(url="http://x/v1", model="tiny", mode="generate", max_new_tokens=4),
                    TokenMap(tok))
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}]
    stopped = Scored(np.array([11, 12], np.int32), np.array([[11, 3, 4], [12, 3, 4]], np.int32),
                     np.full((2, 3), -1.0, np.float32), stopped=True)
    cut = Scored(np.array([13, 14, 15, 16], np.int32), np.tile(np.array([[13, 3, 4]], np.int32), (4, 1)),
                 np.full((4, 3), -2.0, np.float32), stopped=False)
    batch = {"inputs": {"input_ids": torch.zeros((2, 3), dtype=torch.long)}, "labels": torch.zeros((2, 3))}
    got = mode.assemble(batch, rows, [stopped, cut])
    eos = tok.eos_token_id
    assert got["inputs"]["input_ids"].tolist() == [[5, 6, 7, 11, 12, eos], [8, 9, 13, 14, 15, 16]]
    assert got["labels"].tolist() == [[-100, -100, 11, 12, eos, -100], [-100, 13, 14, 15, 16, -100]]
    top = got["soft_targets"]
    assert top.indices[0, 4, 0] == eos and top.logprobs[0, 4, 0] == 0.0 and (top.logprobs[0, 4, 1:] < -1e3).all()
    assert len(set(top.indices[0, 4].tolist())) == 3  # distinct ids: the one-hot is a proper distribution
    assert top.logprobs[1, 1:5].eq(-2.0).all() and top.logprobs[0, 2:4].eq(-1.0).all()
    assert got["inputs"]["attention_mask"].tolist() == [[1] * 6, [1] * 6]
    # A server that lists the stop token (vLLM) gave its distribution: nothing appended, nothing one-hot.
    listed = Scored(np.array([11, eos], np.int32), np.array([[11, 3, 4], [eos, 3, 4]], np.int32),
                    np.full((2, 3), -0.5, np.float32), stopped=True)
    got = mode.assemble(batch, rows[:1], [listed])
    assert got["inputs"]["input_ids"].tolist() == [[5, 6, 7, 11, eos]]
    assert got["labels"].tolist() == [[-100, -100, 11, eos, -100]] and got["soft_targets"].logprobs[0, 3].eq(-0.5).all()


# ---------------------------------------------------------------------------------------------
# Faults: backoff, k reduction and restore, clear errors, the concurrency limit


def test_rate_limits_lower_k_and_successes_restore_it(teacher_lm):
    faults = Faults(build_app(teacher_lm, "tiny"), [(429, {"Retry-After": "0.3"}), 429])
    with BackgroundServer(faults) as url:
        client = EndpointClient(endpoint(url), None)
        try:
            started = time.perf_counter()
            _, k = client.call(client.post("/completions", score_body))
            assert time.perf_counter() - started >= 0.3  # Retry-After honoured
            assert k == 3 and client.k == 3  # asked with min_top_k after the 429s
            for _ in range(8):  # nine successes in a row: still reduced
                client.call(client.post("/completions", score_body))
            assert client.k == 3
            client.call(client.post("/completions", score_body))
            assert client.k == 5  # the tenth restores it
            figures = client.snapshot()
            assert figures["rate_limited"] == 2 and figures["retries"] == 2 and figures["ok"] == 10
        finally:
            client.close()


def test_server_errors_timeouts_and_garbage_are_retried(teacher_lm):
    faults = Faults(build_app(teacher_lm, "tiny"), [500, 503, "hang", "garbage"])
    with BackgroundServer(faults) as url:
        client = EndpointClient(endpoint(url, timeout_s=0.5, max_retries=4), None)
        try:
            answer, _ = client.call(client.post("/completions", score_body))
            assert answer["choices"][0]["logprobs"]["tokens"]
            assert client.snapshot()["retries"] == 4
        finally:
            client.close()


def test_bad_request_fails_at_once_and_exhausted_retries_name_the_cause(teacher_lm):
    faults = Faults(build_app(teacher_lm, "tiny"), [400] + [500] * 10)
    with BackgroundServer(faults) as url:
        client = EndpointClient(endpoint(url, max_retries=2), None)
        try:
            with pytest.raises(RemoteTeacherError, match="HTTP 400: injected 400.*not retried"):
                client.call(client.post("/completions", score_body))
            assert faults.completions == 1
            with pytest.raises(RemoteTeacherError, match="gave up after 3 attempts.*max_retries=2.*HTTP 500"):
                client.call(client.post("/completions", score_body))
            # The real server's own 400: more logprobs than it allows
            faults.script.clear()
            with pytest.raises(RemoteTeacherError, match="HTTP 400: logprobs must be an integer in \\[0, 20\\]"):
                client.call(client.post("/completions", lambda k: score_body(25)))
        finally:
            client.close()


def test_requests_in_flight_never_exceed_the_concurrency(teacher_lm):
    faults = Faults(build_app(teacher_lm, "tiny"), delay_s=0.1)
    with BackgroundServer(faults) as url:
        client = EndpointClient(endpoint(url, concurrency=3), None)
        try:
            futures = [client.submit(client.post("/completions", score_body)) for _ in range(12)]
            for f in futures:
                f.result(timeout=30)
            assert faults.max_active == 3 and client.max_in_flight == 3
        finally:
            client.close()


# ---------------------------------------------------------------------------------------------
# Through train_kd.py: telemetry, cache reuse, the key, failure and resume, offline


def remote_config(tmp: Path, llama: Path, url: str, out: str, **endpoint_kw) -> Path:
    ep = {"url": url, "model": "tiny", "top_k": 5, "min_top_k": 3, "max_retries": 1, "backoff_s": 0.01,
          "max_backoff_s": 0.02, "timeout_s": 10.0, "prefetch_batches": 2}
    ep.update(endpoint_kw)
    data = tmp / "data"
    if not data.exists():
        write_lm_dataset(data, "prompt_completion", {"train": 24, "validation": 8})
    cfg = {"run": {"name": out, "output_dir": str(tmp / out), "seed": 0},
           "data": {"dataset": "json", "data_dir": str(data), "modality": "causal_lm", "eval_split": "validation",
                    "max_length": 48, "num_workers": 0},
           "teacher": {"model": str(llama), "endpoint": ep},
           "student": {"type": "hf", "init_from_teacher": True, "teacher_layers": [0, 2]},
           "distillation": {"alpha": 0.5, "temperature": 1.0, "cache_dir": str(tmp / "cache")},
           "train": {"batch_size": 4, "epochs": None, "max_steps": 8, "lr": 0.01, "eval_every": 4,
                     "checkpoint_every": 2},
           "telemetry": {"log_every": 1, "warmup_steps": 0}}
    return write_config(tmp / f"{out}.yaml", cfg)


def steps(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir / "telemetry.jsonl") if e["type"] == "step"]


@pytest.mark.launches
def test_remote_run_telemetry_cache_reuse_and_the_key(tmp_path, llama, teacher_lm):
    faults = Faults(build_app(teacher_lm, "tiny", api_key=KEY))
    env = {"KD_TEST_TEACHER_KEY": KEY}
    with BackgroundServer(faults) as url:
        first = run_cli(["--config", str(remote_config(tmp_path, llama, url, "first",
                                                       api_key_env="KD_TEST_TEACHER_KEY"))], env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        fetched = faults.completions
        stored = stored_answers(tmp_path)
        second = run_cli(["--config", str(remote_config(tmp_path, llama, url, "second",
                                                        api_key_env="KD_TEST_TEACHER_KEY")),
                          "--cache-read-only"], env=env)
        assert second.returncode == 0, second.stderr[-3000:]
        missing_key = run_cli(["--config", str(remote_config(tmp_path, llama, url, "nokey",
                                                             api_key_env="KD_NOT_SET_VAR"))])
    remote = [s["remote_teacher"] for s in steps(tmp_path / "first")]
    assert {"requests", "hit_rate", "latency_p50_s", "latency_p95_s", "retries", "rate_limited", "k", "queue",
            "wait_s"} <= set(remote[0])
    assert sum(r["requests"] for r in remote) > 0 and remote[0]["k"] == 5
    assert remote[-1]["hit_rate"] == 1.0  # the last steps replay the first epoch's rows from the cache
    # A second run of the same data asks the server nothing but the probe.
    assert faults.completions == fetched + 1
    assert stored_answers(tmp_path) == stored  # --cache-read-only wrote nothing
    again = [s["remote_teacher"] for s in steps(tmp_path / "second")]
    assert sum(r["requests"] for r in again) == 0 and all(r["hit_rate"] == 1.0 for r in again)
    # The key went to the server but nowhere into the run folders.
    for run in ("first", "second"):
        for path in (tmp_path / run).rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), path
    assert missing_key.returncode == 2
    assert "teacher.endpoint.api_key_env: the environment variable KD_NOT_SET_VAR is not set" in missing_key.stderr
    assert "Traceback" not in missing_key.stderr


def losses(run_dir: Path) -> dict[int, float]:
    logged = [(s["step"], s["loss"]["total"]) for s in steps(run_dir)]
    assert len({step for step, _ in logged}) == len(logged), "a step was trained twice"
    return dict(logged)


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "student" / "model.safetensors")


def assert_trained_alike(run_dir: Path, reference: Path) -> None:
    """Every step (logged once, whichever run of the folder trained it) has the reference's loss, and
    the student ends with the reference's weights."""
    ran, ref = losses(run_dir), losses(reference)
    assert sorted(ran) == sorted(ref)
    for step, loss in ran.items():
        assert loss == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    mine, theirs = student_weights(run_dir), student_weights(reference)
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


# remote_config's rows have different lengths (data.packing is off), as where the outage was first seen.
OUTAGE = {"outage_wait_s": 1.0}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, llama, teacher_lm) -> Path:
    """An uninterrupted run of remote_config: what every outage below must end up having trained."""
    tmp = tmp_path_factory.mktemp("reference")
    with BackgroundServer(Faults(build_app(teacher_lm, "tiny"))) as url:
        result = run_cli(["--config", str(remote_config(tmp, llama, url, "reference", **OUTAGE))])
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "reference"


@pytest.mark.launches
def test_a_server_that_comes_back_within_the_wait_costs_nothing_but_time(tmp_path, llama, teacher_lm, reference_run):
    # After 14 answers (the probe and 13 rows) every completion fails for 0.3 s: requests spend their
    # retries (max_retries 1, 10-20 ms apart) within it; the run waits for the server (outage_wait_s 1),
    # sends the failed requests again and trains on exactly what the uninterrupted run did.
    faults = Faults(build_app(teacher_lm, "tiny"), outage=(14, 0.3))
    with BackgroundServer(faults) as url:
        result = run_cli(["--config", str(remote_config(tmp_path, llama, url, "run", **OUTAGE))])
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(tmp_path / "run" / "telemetry.jsonl")
    warnings = [e for e in events if e["type"] == "warning"]
    codes = [w["code"] for w in warnings]
    assert "teacher_down" in codes and "teacher_back" in codes
    down = next(w for w in warnings if w["code"] == "teacher_down")
    assert "gave up after 2 attempts" in down["message"] and "HTTP 500" in down["message"]
    assert "teacher.endpoint.outage_wait_s" in down["message"]
    assert events[-1]["type"] == "run_end" and events[-1]["status"] == "completed"
    assert_trained_alike(tmp_path / "run", reference_run)


@pytest.mark.launches
def test_an_outage_never_ends_a_run_on_part_of_its_data(tmp_path, llama, teacher_lm, reference_run):
    # 1. The server starts failing after 14 answers and stays down: the run waits outage_wait_s, then
    #    stops at a checkpoint and says the server is still down.
    faults = Faults(build_app(teacher_lm, "tiny"), [None] * 14 + [500] * 10**6)  # down for good
    with BackgroundServer(faults) as url:
        failed = run_cli(["--config", str(remote_config(tmp_path, llama, url, "run", **OUTAGE))])
    down = url  # nothing listens there any more
    before = stored_answers(tmp_path)
    assert failed.returncode == 2
    error = failed.stderr.strip().splitlines()[-1]
    assert "gave up after 2 attempts" in error and "HTTP 500" in error and "still down after waiting 1 s" in error
    assert "continue with --resume" in error and "Traceback" not in failed.stderr
    end = read_events(tmp_path / "run" / "telemetry.jsonl")[-1]
    assert end["type"] == "run_end" and end["status"] == "failed"
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert checkpoints
    last_step = int(checkpoints[-1].split("_")[1])

    # 2. Resumed while the server is still down: it waits, then stops, and trains on nothing.
    resumed_down = run_cli(["--config", str(remote_config(tmp_path, llama, down, "run", **OUTAGE)), "--resume"])
    assert resumed_down.returncode == 2
    error = resumed_down.stderr.strip().splitlines()[-1]
    assert "still down after waiting 1 s (teacher.endpoint.outage_wait_s)" in error
    assert "of 24 training samples have no cached answer" in error and "--cache-read-only" in error
    assert "Traceback" not in resumed_down.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == checkpoints
    assert all(e["status"] != "completed" for e in read_events(tmp_path / "run" / "telemetry.jsonl")
               if e["type"] == "run_end")

    # 3. Asked for (--cache-read-only): a new run trains on the cached samples and counts the rest; a
    #    resume on that subset is refused, since the checkpoint's epoch was planned over all 24.
    subset = run_cli(["--config", str(remote_config(tmp_path, llama, down, "subset", **OUTAGE)), "--cache-read-only"])
    assert subset.returncode == 0, subset.stderr[-3000:]
    line = next(ln for ln in subset.stdout.splitlines() if ln.startswith("Remote teacher offline: train split"))
    cached, total = map(int, line.split("train split ")[1].split(" ")[0].split("/"))
    assert total == 24 and 0 < cached < 24 and f"{24 - cached} missing" in line
    refused = run_cli(["--config", str(remote_config(tmp_path, llama, down, "run", **OUTAGE)), "--resume",
                       "--cache-read-only"])
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert f"the checkpoint's epochs are over 24 training samples and this run has {cached}" in refused.stderr

    # 4. Back online: --resume asks only for what is not cached and ends with every row trained as the
    #    uninterrupted run trained it.
    healthy = Faults(build_app(teacher_lm, "tiny"))
    with BackgroundServer(healthy) as url:
        resumed = run_cli(["--config", str(remote_config(tmp_path, llama, url, "run", **OUTAGE)), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout
    distinct = {json.dumps(json.loads(line), sort_keys=True) for split in ("train", "validation")
                for line in (tmp_path / "data" / f"{split}.jsonl").read_text().splitlines()}
    assert stored_answers(tmp_path) == len(distinct)  # every distinct row answered once across the runs
    assert healthy.completions == 1 + len(distinct) - before  # the probe and the rows the failed run lacked
    assert min(s["step"] for s in steps(tmp_path / "run") if s["step"] > last_step) == last_step + 1
    assert_trained_alike(tmp_path / "run", reference_run)


@pytest.mark.launches
def test_generate_run_trains_on_answers_and_a_rerun_asks_only_what_changed(tmp_path, llama, teacher_lm):
    faults = Faults(build_app(teacher_lm, "tiny"))
    generate = {"mode": "generate", "max_new_tokens": 8}
    with BackgroundServer(faults) as url:
        first = run_cli(["--config", str(remote_config(tmp_path, llama, url, "gen", **generate))])
        assert first.returncode == 0, first.stderr[-3000:]
        asked = faults.completions
        again = run_cli(["--config", str(remote_config(tmp_path, llama, url, "gen2", **generate))])
        assert again.returncode == 0, again.stderr[-3000:]
        after_rerun = faults.completions
        shorter = run_cli(["--config", str(remote_config(tmp_path, llama, url, "gen3", mode="generate",
                                                         max_new_tokens=5))])
        assert shorter.returncode == 0, shorter.stderr[-3000:]
    prompts = {json.loads(line)["prompt"] for split in ("train", "validation")
               for line in (tmp_path / "data" / f"{split}.jsonl").read_text().splitlines()}
    assert asked == 1 + len(prompts)  # the probe, then each distinct prompt answered once
    assert after_rerun == asked + 1  # the same request again: only the probe, every answer from the cache
    assert faults.completions == after_rerun + 1 + len(prompts)  # max_tokens is part of the request's key
    events = read_events(tmp_path / "gen" / "telemetry.jsonl")
    start = next(e for e in events if e["type"] == "run_start")
    assert start["soft_targets"]["mode"] == "generate" and start["soft_targets"]["max_new_tokens"] == 8
    evals = [e for e in events if e["type"] == "eval"]
    # Greedy answers: the teacher's top token is the one it wrote, at every learnt position.
    assert evals and evals[-1]["metrics"]["teacher_acc"] == 1.0 and evals[-1]["metrics"]["tokens"] > 0
    assert sum(s["remote_teacher"]["requests"] for s in steps(tmp_path / "gen2")) == 0
    assert "training prompts (the remote teacher writes the answers)" in first.stdout


@pytest.mark.launches
@pytest.mark.parametrize("name", ["remote_teacher.yaml", "remote_teacher_generate.yaml"])
def test_the_shipped_remote_configs_train_as_written(tmp_path, llama, teacher_lm, name):
    """Each shipped remote-teacher config runs with its own settings (mode, packing, lengths, top k...):
    only where things are (model, data, server, run folder) and how long are changed."""
    data = write_lm_dataset(tmp_path / "data", "text", {"train": 16, "validation": 4, "test": 4})
    with BackgroundServer(build_app(teacher_lm, "tiny")) as url:
        result = run_cli(["--config", str(ROOT / "configs" / name), f"teacher.model={llama}", f"data.data_dir={data}",
                          f"teacher.endpoint.url={url}", "teacher.endpoint.model=tiny", "student.teacher_layers=[0,2]",
                          f"run.output_dir={tmp_path / 'run'}", f"distillation.cache_dir={tmp_path / 'cache'}",
                          "train.max_steps=3", "train.eval_every=3", "train.checkpoint_every=3"])
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(tmp_path / "run" / "telemetry.jsonl")
    start, end = events[0], events[-1]
    assert start["soft_targets"]["mode"] == load_config(ROOT / "configs" / name).teacher.endpoint.mode
    assert start["soft_targets"]["precision"] == "fp32"
    assert start["soft_targets"]["agreement"]["top1_agree"] == start["soft_targets"]["agreement"]["positions"]
    assert end["status"] == "completed" and "teacher_acc" in end["metrics"]["test"]


def stored_answers(tmp: Path) -> int:
    with sqlite3.connect(tmp / "cache" / "remote_teacher.sqlite") as conn:
        return conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


def test_server_chat_answers_greedily_with_top_logprobs(teacher_lm):
    import httpx

    from kd.teachers.remote.protocol import chat_logprobs

    messages = [{"role": "user", "content": "finish: the cat"}]
    with BackgroundServer(build_app(teacher_lm, "tiny")) as url:
        answer = httpx.post(f"{url}/chat/completions", json={
            "model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True,
            "top_logprobs": 3, "return_tokens_as_token_ids": True}, timeout=30).json()
        unknown = httpx.post(f"{url}/chat/completions", json={"model": "other", "messages": messages}, timeout=30)
    tokens, values, top = chat_logprobs(answer)
    tok = teacher_lm.tokenizer
    prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = teacher_lm.model.generate(prompt, max_new_tokens=4, do_sample=False,
                                           pad_token_id=tok.pad_token_id)[0, prompt.shape[1]:].tolist()
    ids = [int(t.split(":")[1]) for t in tokens]
    assert ids == greedy[:len(ids)] and answer["usage"]["prompt_tokens"] == prompt.shape[1]
    assert all(len(entry) == 3 and max(entry.values()) == pytest.approx(v, abs=1e-5) for entry, v in zip(top, values))
    assert unknown.status_code == 400 and "is not served here" in unknown.json()["error"]["message"]


def test_cache_read_only_needs_a_remote_teacher(tmp_path, capsys):
    import train_kd

    cfg = write_config(tmp_path / "c.yaml", {"data": {"dataset": "json"}, "distillation": {"enabled": False}})
    assert train_kd.main(["--config", str(cfg), "--cache-read-only"]) == 2
    assert "--cache-read-only is for a remote teacher" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The answer store


def answer(seed: int):
    import numpy as np

    from kd.teachers.remote.protocol import Scored

    rng = np.random.default_rng(seed)
    return Scored(rng.integers(0, 300, 12).astype(np.int32), rng.integers(0, 300, (12, 5)).astype(np.int32),
                  rng.standard_normal((12, 5)).astype(np.float32))


def test_answer_store_survives_concurrent_writers_and_honours_ttl_and_read_only(tmp_path):
    import multiprocessing
    import threading

    import numpy as np

    from kd.teachers.remote.response_cache import ResponseCache

    identity = {"model": "tiny", "tokenizer": "abc"}
    cache = ResponseCache(tmp_path, identity)
    threads = [threading.Thread(target=lambda t=t: [cache.put(cache.key({"prompt": [t, i]}), answer(t * 100 + i))
                                                    for i in range(40)]) for t in range(6)]
    procs = [multiprocessing.get_context("spawn").Process(target=_write_answers, args=(str(tmp_path), identity, p))
             for p in range(2)]
    for worker in threads + procs:
        worker.start()
    for worker in threads + procs:
        worker.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    assert cache.count() == 6 * 40 + 2 * 40
    with sqlite3.connect(cache.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    got = cache.get(cache.key({"prompt": [3, 7]}))
    assert np.array_equal(got.top_logprobs, answer(307).top_logprobs) and np.array_equal(got.ids, answer(307).ids)
    # Another identity (a new revision of the weights) reads nothing of this one's.
    assert ResponseCache(tmp_path, dict(identity, reported={"kd_revision": "new"})).get(
        ResponseCache(tmp_path, dict(identity, reported={"kd_revision": "new"})).key({"prompt": [3, 7]})) is None
    # TTL: an answer older than the limit counts as absent
    short = ResponseCache(tmp_path, identity, ttl_s=0.2)
    time.sleep(0.3)
    assert short.get(short.key({"prompt": [3, 7]})) is None
    # Read-only: reads, never writes
    reader = ResponseCache(tmp_path, identity, read_only=True)
    assert reader.get(reader.key({"prompt": [3, 7]})) is not None
    assert reader.put(reader.key({"prompt": ["new"]}), answer(1)) is False and cache.count() == 320


def _write_answers(folder: str, identity: dict, p: int) -> None:
    from kd.teachers.remote.response_cache import ResponseCache

    cache = ResponseCache(Path(folder), identity)
    for i in range(40):
        cache.put(cache.key({"prompt": ["process", p, i]}), answer(10_000 + p * 100 + i))
