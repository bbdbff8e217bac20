"""A remote teacher (teacher.endpoint) against the kit's own server on 127.0.0.1: the soft targets
equal the local teacher's, faults drive the retry policy, answers are cached and reused, the key
never reaches the run folder, and a run that failed on the server resumes without refetching."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from starlette.responses import JSONResponse, PlainTextResponse

from conftest import run_cli, write_config
from kd.config import EndpointConfig, config_from_dict
from kd.lm_losses import TopK
from kd.openai_api import ProtocolError, TokenMap, check_alignment
from kd.remote_client import EndpointClient, RemoteTeacherError, retry_after_s
from kd.remote_teacher import RemoteTeacher
from kd.serve_teacher import BackgroundServer, TeacherLM, build_app
from kd.synthetic import save_tiny_llama, save_tiny_tokenizer, write_lm_dataset
from kd.telemetry import read_events

KEY = "sk-test-1234567890-secret"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def teacher_lm(llama) -> TeacherLM:
    return TeacherLM(str(llama), "cpu")


class Faults:
    """ASGI middleware in front of the teacher server: /v1/completions answers follow `script`
    (None: the real answer), counting requests and the most in flight at once."""

    def __init__(self, app, script=(), delay_s: float = 0.0):
        self.app, self.script, self.delay_s = app, list(script), delay_s
        self.completions = self.active = self.max_active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await self.app(scope, receive, send)
        self.completions += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            fault = self.script.pop(0) if self.script else None
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


def test_remote_scores_equal_the_local_teachers_top_k(tmp_path, llama, teacher_lm):
    data = write_lm_dataset(tmp_path / "data", "text", {"train": 4, "validation": 2})
    cfg = config_from_dict({
        "data": {"dataset": "json", "data_dir": str(data), "modality": "causal_lm", "input_column": "text"},
        "teacher": {"model": str(llama), "endpoint": {"url": "http://127.0.0.1:1/v1", "model": "tiny", "top_k": 8, "min_top_k": 4}},
        "student": {"type": "hf"}, "distillation": {"cache_dir": str(tmp_path / "cache")}})
    tok = teacher_lm.tokenizer
    rows = [tok(t)["input_ids"] for t in ("the cat sat on the mat", "a dog ran", "birds sing loud songs today")]
    longest = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (longest - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
    labels = torch.where(mask.roll(-1, 1).bool(), ids.roll(-1, 1), torch.full_like(ids, -100))
    labels[:, -1] = -100
    batch = {"inputs": {"input_ids": ids, "attention_mask": mask}, "labels": labels}
    with BackgroundServer(build_app(teacher_lm, "tiny")) as url:
        cfg.teacher.endpoint.url = url
        remote = RemoteTeacher(cfg, tok, say=lambda *a: None)
        try:
            got = remote.logits(batch, "train")
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


def test_remote_run_telemetry_cache_reuse_and_the_key(tmp_path, llama, teacher_lm):
    faults = Faults(build_app(teacher_lm, "tiny", api_key=KEY))
    env = {"KD_TEST_TEACHER_KEY": KEY}
    with BackgroundServer(faults) as url:
        first = run_cli(["--config", str(remote_config(tmp_path, llama, url, "first", api_key_env="KD_TEST_TEACHER_KEY"))],
                        env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        fetched = faults.completions
        stored = stored_answers(tmp_path)
        second = run_cli(["--config", str(remote_config(tmp_path, llama, url, "second", api_key_env="KD_TEST_TEACHER_KEY")),
                          "--cache-read-only"], env=env)
        assert second.returncode == 0, second.stderr[-3000:]
        missing_key = run_cli(["--config", str(remote_config(tmp_path, llama, url, "nokey", api_key_env="KD_NOT_SET_VAR"))])
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


def test_failed_run_checkpoints_trains_offline_and_resumes_without_refetching(tmp_path, llama, teacher_lm):
    # 1. The server starts failing after 14 answers (the probe + 13 rows): the run stops, checkpointed.
    faults = Faults(build_app(teacher_lm, "tiny"), [None] * 14 + [500] * 200)
    with BackgroundServer(faults) as url:
        failed = run_cli(["--config", str(remote_config(tmp_path, llama, url, "run"))])
    down = url  # nothing listens there any more
    before = stored_answers(tmp_path)
    assert failed.returncode == 2
    error = failed.stderr.strip().splitlines()[-1]
    assert "gave up after 2 attempts" in error and "HTTP 500" in error and "continue with --resume" in error
    assert "Traceback" not in failed.stderr
    end = read_events(tmp_path / "run" / "telemetry.jsonl")[-1]
    assert end["type"] == "run_end" and end["status"] == "failed"
    assert list((tmp_path / "run" / "checkpoints").glob("step_*"))
    # 2. The server is down: a run trains on the cached answers and says how many are missing.
    offline = run_cli(["--config", str(remote_config(tmp_path, llama, down, "offline"))])
    assert offline.returncode == 0, offline.stderr[-3000:]
    line = next(ln for ln in offline.stdout.splitlines() if ln.startswith("Remote teacher offline: train split"))
    cached, total = map(int, line.split("train split ")[1].split(" ")[0].split("/"))
    assert total == 24 and 0 < cached < 24 and f"{24 - cached} missing" in line
    # 3. Back online: --resume continues from the checkpoint and asks only for what is not cached.
    healthy = Faults(build_app(teacher_lm, "tiny"))
    with BackgroundServer(healthy) as url:
        resumed = run_cli(["--config", str(remote_config(tmp_path, llama, url, "run")), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout
    distinct = {json.dumps(json.loads(line), sort_keys=True) for split in ("train", "validation")
                for line in (tmp_path / "data" / f"{split}.jsonl").read_text().splitlines()}
    assert stored_answers(tmp_path) == len(distinct)  # every distinct row answered once across the three runs
    assert healthy.completions == 1 + len(distinct) - before  # the probe and the rows the failed run lacked


def stored_answers(tmp: Path) -> int:
    with sqlite3.connect(tmp / "cache" / "remote_teacher.sqlite") as conn:
        return conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


def test_server_chat_answers_greedily_with_top_logprobs(teacher_lm):
    import httpx

    from kd.openai_api import chat_logprobs

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

    from kd.openai_api import Scored

    rng = np.random.default_rng(seed)
    return Scored(rng.integers(0, 300, 12).astype(np.int32), rng.integers(0, 300, (12, 5)).astype(np.int32),
                  rng.standard_normal((12, 5)).astype(np.float32))


def test_answer_store_survives_concurrent_writers_and_honours_ttl_and_read_only(tmp_path):
    import multiprocessing
    import threading

    import numpy as np

    from kd.response_cache import ResponseCache

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
    from kd.response_cache import ResponseCache

    cache = ResponseCache(Path(folder), identity)
    for i in range(40):
        cache.put(cache.key({"prompt": ["process", p, i]}), answer(10_000 + p * 100 + i))
