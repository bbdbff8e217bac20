"""Serve a local safetensors causal LM as a teacher over the OpenAI-compatible subset the kit speaks.

    python -m kd.teachers.remote.server --model .bench/smollm2-135m --port 8000
    python -m kd.teachers.remote.server --model FOLDER --host 0.0.0.0 --api-key-env TEACHER_KEY   # for others

Then point a run at it (teacher.endpoint.url: http://HOST:8000/v1, model: the folder's name or --name).
Answers, as vLLM does:

- `GET /v1/models`: the model id, with `kd_revision` (a hash of the weights) for the client's cache key.
- `POST /v1/completions`: `prompt` as text or token ids, `max_tokens` (0 allowed with echo),
  `temperature`, `echo`, `logprobs` (top k, at most --max-logprobs), `return_tokens_as_token_ids`.
  With echo, entry i of the logprobs describes prompt token i (entry 0 has none) and each position's
  top k also holds the token actually there, as vLLM's do.
- `POST /v1/chat/completions`: `messages` (rendered with the tokenizer's chat template),
  `logprobs` and `top_logprobs`.

Concurrent requests are batched: requests arriving within --batch-wait-ms of each other (up to
--max-batch) share one padded forward (scoring) or one `generate` call, on the GPU when there is one.
Built on Starlette and uvicorn. No sampling state is kept between requests; temperature 0 is greedy.
Weights are loaded through the kit's teacher loader: safetensors only, never pickles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kd.teachers.remote.protocol import TOKEN_ID_PREFIX, chat_prompt_ids

MAX_LOGPROBS = 20


class BadRequest(Exception):
    """A request the server will not run (HTTP 400, OpenAI's error shape)."""


# ---------------------------------------------------------------------------------------------
# The model side: batched scoring and generation


@dataclass
class Job:
    """One request's work: score `ids` (echo) and/or continue them by `max_tokens` tokens."""

    ids: list[int]
    k: int
    max_tokens: int
    temperature: float
    echo: bool
    future: asyncio.Future = field(repr=False, default=None)


@dataclass
class Answer:
    """Per position: the token, its log-probability, and the top k {id: logprob} (None: no entry)."""

    tokens: list[int]
    logprobs: list[float | None]
    top: list[dict[int, float] | None]
    prompt_len: int
    finish_reason: str


class TeacherLM:
    """A causal LM and its tokenizer, answering batches of jobs (called from one worker thread)."""

    def __init__(self, folder: str, device: str = "auto", dtype: str = "fp32"):
        from kd.lm.vocabulary import cut_to_tokenizer
        from kd.teachers.loading import load_processor, load_teacher

        self.tokenizer = load_processor(folder, "causal_lm", what="--model")
        self.model = load_teacher(folder, "causal_lm", dtype=dtype)
        cut_to_tokenizer(self.model, len(self.tokenizer))  # padded logit rows are no token: never answered
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.model.to(self.device)
        self.model.config.use_cache = True
        files = sorted(Path(folder).glob("*.safetensors"))
        digest = hashlib.sha256()
        for p in files:  # size + first MB: cheap, and changes when the weights do
            digest.update(f"{p.name}:{p.stat().st_size}".encode())
            with open(p, "rb") as f:
                digest.update(f.read(1 << 20))
        self.revision = digest.hexdigest()[:16]
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> list[Answer]:
        # One forward over the prompts that need it (echo, or a single next token); longer answers
        # come from generate, which reads its prompt itself.
        scored = [j for j in jobs if j.echo or j.max_tokens <= 1]
        prompt_logp = dict(zip(map(id, scored), self._score([j.ids for j in scored]))) if scored else {}
        continuing = [j for j in jobs if j.max_tokens > 1]
        generated = self._generate(continuing) if continuing else {}
        answers = []
        for job in jobs:
            logp = prompt_logp.get(id(job))
            tokens, values, top = [], [], []
            if job.echo:
                tokens = list(job.ids)
                values = [None] + [float(logp[i - 1, t]) for i, t in enumerate(job.ids) if i > 0]
                top = [None] + [self._top(logp[i - 1], job.k, t) for i, t in enumerate(job.ids) if i > 0]
            finish = "length"
            if job.max_tokens == 1:  # the next token's distribution is the prompt forward's last row
                nxt = self._pick(logp[len(job.ids) - 1], job.temperature)
                new = [(nxt, logp[len(job.ids) - 1])]
            elif job.max_tokens > 1:
                new = generated[id(job)]
            else:
                new = []
            for t, row in new:
                tokens.append(t)  # as vLLM: the stop token is listed with its logprobs (not in the text)
                values.append(float(row[t]))
                top.append(self._top(row, job.k, t))
                if t == self.eos:
                    finish = "stop"
                    break
            answers.append(Answer(tokens, values, top, prompt_len=len(job.ids) if job.echo else 0,
                                  finish_reason=finish))
        return answers

    def _score(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Log-probabilities (len, vocab) at every position of each row: one right-padded forward."""
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        return [logp[i, :len(r)] for i, r in enumerate(rows)]

    def _generate(self, jobs: list[Job]) -> dict[int, list[tuple[int, torch.Tensor]]]:
        """Per job (keyed by id(job)): (token, log-probabilities it was drawn from) per new token, one
        left-padded generate call per temperature."""
        out: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for temperature in sorted({j.temperature for j in jobs}):
            group = [j for j in jobs if j.temperature == temperature]
            longest = max(len(j.ids) for j in group)
            ids = torch.full((len(group), longest), self.pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, j in enumerate(group):
                ids[i, longest - len(j.ids):] = torch.tensor(j.ids)
                mask[i, longest - len(j.ids):] = 1
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else \
                {"do_sample": False}
            result = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                         max_new_tokens=max(j.max_tokens for j in group), pad_token_id=self.pad,
                                         eos_token_id=self.eos, output_logits=True, return_dict_in_generate=True,
                                         **sampling)
            steps = torch.stack(result.logits, 1).float()  # (batch, new, vocab), before any processing
            logp = torch.log_softmax(steps, -1).cpu()
            new = result.sequences[:, longest:].cpu()
            for i, j in enumerate(group):
                n = min(j.max_tokens, new.shape[1])
                out[id(j)] = [(int(new[i, s]), logp[i, s]) for s in range(n)]
        return out

    @staticmethod
    def _pick(row: torch.Tensor, temperature: float) -> int:
        if temperature <= 0:
            return int(row.argmax())
        return int(torch.multinomial(torch.softmax(row / temperature, -1), 1))

    @staticmethod
    def _top(row: torch.Tensor, k: int, chosen: int) -> dict[int, float]:
        values, ids = row.topk(k)
        top = {int(i): float(v) for i, v in zip(ids, values)}
        top.setdefault(int(chosen), float(row[chosen]))  # the actual token too, as vLLM does
        return top


class Batcher:
    """Collects jobs for up to `wait_s` (at most `max_batch`) and runs them together in a thread."""

    def __init__(self, lm: TeacherLM, max_batch: int = 16, wait_s: float = 0.005):
        self.lm, self.max_batch, self.wait_s = lm, max_batch, wait_s
        self.queue: asyncio.Queue[Job] | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._worker())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def submit(self, job: Job) -> Answer:
        job.future = asyncio.get_running_loop().create_future()
        await self.queue.put(job)
        return await job.future

    async def _worker(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - time.monotonic())))
                except asyncio.TimeoutError:
                    break
            try:
                answers = await asyncio.to_thread(self.lm.run, jobs)
                self.batches += 1
                for job, answer in zip(jobs, answers):
                    if not job.future.done():
                        job.future.set_result(answer)
            except Exception as exc:  # reported to every waiting request as a 500
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)


# ---------------------------------------------------------------------------------------------
# The HTTP side


def build_app(lm: TeacherLM, name: str, *, api_key: str | None = None, max_batch: int = 16,
              batch_wait_ms: float = 5.0, max_logprobs: int = MAX_LOGPROBS):
    """The Starlette application (tests serve it on 127.0.0.1; main() runs it under uvicorn)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    batcher = Batcher(lm, max_batch, batch_wait_ms / 1000.0)
    created = int(time.time())

    def error(status: int, message: str, kind: str = "BadRequestError") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    def authorised(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if body.get("model") not in (name, None):
            raise BadRequest(f"model {body.get('model')!r} is not served here; this server serves {name!r}")
        return body

    def int_field(body: dict[str, Any], key: str, default: int, *, low: int, high: int | None = None) -> int:
        value = body.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            bound = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
            raise BadRequest(f"{key} must be {bound}, got {value!r}")
        return value

    def temperature_of(body: dict[str, Any]) -> float:
        value = body.get("temperature", 1.0)
        if value is None:
            return 1.0
        if not isinstance(value, (int, float)) or value < 0:
            raise BadRequest(f"temperature must be a number >= 0, got {value!r}")
        return float(value)

    def token_name(token: int, as_ids: bool) -> str:
        return f"{TOKEN_ID_PREFIX}{token}" if as_ids else lm.tokenizer.decode([token])

    def guarded(handler):
        async def endpoint(request: Request) -> JSONResponse:
            if not authorised(request):
                return error(401, "missing or wrong API key (Authorization: Bearer ...)", "AuthenticationError")
            try:
                return await handler(request)
            except BadRequest as exc:
                return error(400, str(exc))
            except Exception as exc:  # noqa: BLE001 - the client sees a 500 with the cause
                return error(500, f"{type(exc).__name__}: {exc}", "InternalServerError")
        return endpoint

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                                         "owned_by": "kd", "kd_revision": lm.revision}]})

    async def completions(request: Request) -> JSONResponse:
        body = await body_of(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            ids = lm.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):  # token ids, not bools
            ids = list(prompt)
            if max(ids) >= len(lm.tokenizer) or min(ids) < 0:
                raise BadRequest(f"prompt token ids must be in [0, {len(lm.tokenizer)})")
        else:
            raise BadRequest("prompt must be a string or a non-empty list of token ids (one prompt per request)")
        echo = bool(body.get("echo", False))
        max_tokens = int_field(body, "max_tokens", 16, low=0 if echo else 1)
        k = body.get("logprobs")
        k = 0 if k is None else int_field(body, "logprobs", 0, low=0, high=max_logprobs)
        as_ids = bool(body.get("return_tokens_as_token_ids", False))
        answer = await batcher.submit(Job(ids, max(k, 1), max_tokens, temperature=temperature_of(body), echo=echo))
        new = answer.tokens[answer.prompt_len:]
        text = (lm.tokenizer.decode(ids) if echo else "") + lm.tokenizer.decode(new, skip_special_tokens=True)
        logprobs = None
        if k:
            logprobs = {"tokens": [token_name(t, as_ids) for t in answer.tokens],
                        "token_logprobs": answer.logprobs,
                        "top_logprobs": [None if top is None else {token_name(t, as_ids): v for t, v in top.items()}
                                         for top in answer.top],
                        "text_offset": _offsets(lm.tokenizer, answer.tokens)}
        return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                             "model": name, "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                                                         "finish_reason": answer.finish_reason}],
                             "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new),
                                       "total_tokens": len(ids) + len(new)}})

    async def chat(request: Request) -> JSONResponse:
        body = await body_of(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise BadRequest("messages must be a non-empty list of {role, content} objects")
        if not getattr(lm.tokenizer, "chat_template", None):
            raise BadRequest("this model's tokenizer has no chat template; use /v1/completions")
        ids = chat_prompt_ids(lm.tokenizer, messages)  # rendered as the kit's prompt data is
        max_tokens = int_field(body, "max_completion_tokens", None, low=1) if body.get("max_completion_tokens") \
            else int_field(body, "max_tokens", 16, low=1)
        want = bool(body.get("logprobs", False))
        k = int_field(body, "top_logprobs", 0, low=0, high=max_logprobs) if want else 0
        as_ids = bool(body.get("return_tokens_as_token_ids", False))
        answer = await batcher.submit(Job(list(ids), max(k, 1), max_tokens, temperature_of(body), echo=False))
        logprobs = None
        if want:
            logprobs = {"content": [{"token": token_name(t, as_ids), "logprob": lp,
                                     "bytes": list(lm.tokenizer.decode([t]).encode()),
                                     "top_logprobs": [{"token": token_name(a, as_ids), "logprob": v}
                                                      for a, v in sorted(top.items(), key=lambda x: (-x[1], x[0]))[:k]]}
                                    for t, lp, top in zip(answer.tokens, answer.logprobs, answer.top)]}
        return JSONResponse({"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                             "created": int(time.time()), "model": name,
                             "choices": [{"index": 0, "message": {"role": "assistant",
                                                                  "content": lm.tokenizer.decode(answer.tokens,
                                                                                                 skip_special_tokens=True)},
                                          "logprobs": logprobs, "finish_reason": answer.finish_reason}],
                             "usage": {"prompt_tokens": len(ids), "completion_tokens": len(answer.tokens),
                                       "total_tokens": len(ids) + len(answer.tokens)}})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "batches": batcher.batches})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = Starlette(routes=[Route("/v1/models", guarded(models), methods=["GET"]),
                            Route("/v1/completions", guarded(completions), methods=["POST"]),
                            Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
                            Route("/health", health, methods=["GET"])],
                    lifespan=lifespan)
    app.state.batcher = batcher
    return app


class BackgroundServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in a thread (tests, benches): `with ... as url:`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.socket = socket.socket()
        self.socket.bind((host, port))  # port 0: a free one, known before the server starts
        self.url = f"http://{host}:{self.socket.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = None

    def __enter__(self) -> str:
        import threading

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the teacher server did not start within 30 s")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


def _offsets(tokenizer: Any, tokens: list[int]) -> list[int]:
    out, pos = [], 0
    for t in tokens:
        out.append(pos)
        pos += len(tokenizer.decode([t]))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kd.teachers.remote.server", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, help="a safetensors causal-LM folder with its tokenizer")
    parser.add_argument("--name", help="the model id clients ask for (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) serves this machine only")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cuda or cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--api-key-env", help="require `Authorization: Bearer $VAR` (the variable's name)")
    parser.add_argument("--max-batch", type=int, default=16, help="requests per forward at most")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for others")
    parser.add_argument("--max-logprobs", type=int, default=MAX_LOGPROBS, help="largest top-k a request may ask")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from kd.errors import KDError

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"error: --api-key-env {args.api_key_env}: the variable is not set", file=sys.stderr)
            return 2
    try:
        lm = TeacherLM(args.model, args.device, args.dtype)
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    name = args.name or Path(args.model).name
    app = build_app(lm, name, api_key=api_key, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                    max_logprobs=args.max_logprobs)
    print(f"Serving {name} ({lm.model.__class__.__name__} on {lm.device}) at http://{args.host}:{args.port}/v1",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
