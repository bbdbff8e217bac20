"""HTTP to an OpenAI-compatible teacher: a bounded number of requests in flight, retries with
backoff, rate limits honoured, and the figures the telemetry reports.

The training loop is synchronous; this client runs its own asyncio event loop in a background
thread (httpx.AsyncClient) and hands out `concurrent.futures.Future`s, so requests for the next
batches travel while the student trains on the current one.

Failure policy, per request (teacher.endpoint):
- HTTP 429: wait `Retry-After` when the server sends it, else exponential backoff with jitter; every
  request pauses until then (the limit is the server's, not one request's), and `top_logprobs` drops
  to `min_top_k` until `RESTORE_AFTER` successes in a row bring it back.
- 5xx, timeouts, broken connections, malformed JSON: retried with backoff.
- Any other 4xx (e.g. too many logprobs, unknown model, a refused key): a clear error at once; it
  would fail the same way again.
- After `max_retries` retries: `RemoteTeacherError` with the last cause. Nothing is skipped silently.
The API key is read from the environment variable the config names and only ever sent in a header.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import random
import threading
import time
from typing import Any, Callable

import httpx

from kd.config import EndpointConfig
from kd.teachers.remote.protocol import server_error
from kd.teachers.source import SourceFailure

RESTORE_AFTER = 10  # consecutive successes before a reduced top_logprobs goes back up


class RemoteTeacherError(SourceFailure):
    """The remote teacher refused a request, or did not answer within the retry budget."""


class GaveUp(RemoteTeacherError):
    """The retry budget is spent on failures that may pass (5xx, 429, timeouts, no connection): the
    server may answer again later, unlike a refused request."""


class Unreachable(GaveUp):
    """No HTTP answer at all (connection refused, DNS, timeouts) after the retry budget."""


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number, or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class EndpointClient:
    """Requests to one endpoint, at most `concurrency` in flight (a semaphore), from any thread."""

    def __init__(self, ep: EndpointConfig, api_key: str | None, seed: int = 0):
        self.ep = ep
        self.base = ep.url.rstrip("/")
        self.k = ep.top_k  # the top_logprobs asked for now (lowered while rate-limited)
        self._streak = 0
        self._paused_until = 0.0
        self._random = random.Random(seed)  # jitter
        self.counters = {"requests": 0, "ok": 0, "retries": 0, "rate_limited": 0, "errors": 0}
        self.troubles = 0  # retries and spent budgets since the client started (never reset; read by warnings)
        self.last_cause = ""  # the latest failure, for the warnings a waiting loop emits
        self.latencies: list[float] = []  # seconds per successful request since the last snapshot
        self.in_flight = 0
        self.max_in_flight = 0
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kd-remote-teacher", daemon=True)
        self._thread.start()

        async def setup() -> None:
            self._semaphore = asyncio.Semaphore(ep.concurrency)
            self._http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(ep.timeout_s),
                                           limits=httpx.Limits(max_connections=ep.concurrency))

        self.call(setup())

    # -- threads -------------------------------------------------------------------------------
    def call(self, coro) -> Any:
        """Run a coroutine on the client's loop and wait for it (from a thread other than the loop's)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self) -> None:
        if not self._loop.is_running():
            return

        async def shutdown() -> None:
            await self._http.aclose()

        try:
            self.call(shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    # -- requests ------------------------------------------------------------------------------
    async def get(self, path: str) -> dict[str, Any]:
        return await self.request("GET", path, lambda k: None)

    async def ping(self, path: str = "/models") -> str | None:
        """One GET, no retries, counted nowhere: None when the server answers (a refusal is an answer
        too: the probe after it says what is wrong), else why not. For waiting out an outage."""
        try:
            response = await self._http.get(f"{self.base}{path}")
        except httpx.TimeoutException:
            return f"no answer within teacher.endpoint.timeout_s={self.ep.timeout_s:g} s"
        except httpx.TransportError as exc:
            return f"connection failed ({type(exc).__name__}: {exc or 'no detail'})"
        if response.status_code >= 500 or response.status_code == 429:
            return f"HTTP {response.status_code} ({_message(response)})"
        return None

    async def post(self, path: str, build: Callable[[int], dict[str, Any]]) -> tuple[dict[str, Any], int]:
        """POST the body `build(k)` (k: the top_logprobs to ask for now) until it succeeds; returns
        (the JSON answer, the k it was asked with)."""
        used = {}

        def body(k: int) -> dict[str, Any]:
            used["k"] = k
            return build(k)

        answer = await self.request("POST", path, body)
        return answer, used["k"]

    async def request(self, method: str, path: str, build: Callable[[int], dict[str, Any] | None]) -> dict[str, Any]:
        url = f"{self.base}{path}"
        attempt, cause = 0, ""
        while True:
            pause = self._paused_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            k = self.k
            delay: float | None = None
            async with self._semaphore:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                self.counters["requests"] += 1
                started = time.perf_counter()
                try:
                    response = await self._http.request(method, url, json=build(k))
                except httpx.TimeoutException:
                    response, cause = None, f"no answer within teacher.endpoint.timeout_s={self.ep.timeout_s:g} s"
                except httpx.TransportError as exc:
                    response, cause = None, f"connection failed ({type(exc).__name__}: {exc or 'no detail'})"
                finally:
                    self.in_flight -= 1
                elapsed = time.perf_counter() - started
            if response is not None:
                status = response.status_code
                if status == 200:
                    try:
                        answer = response.json()
                    except ValueError:
                        answer, cause = None, "HTTP 200 with a body that is not JSON"
                    if isinstance(answer, dict):
                        self._succeeded(elapsed)
                        return answer
                    cause = cause or "HTTP 200 with a JSON body that is not an object"
                elif status == 429:
                    self.counters["rate_limited"] += 1
                    wait = retry_after_s(response.headers.get("retry-after"))
                    delay = wait if wait is not None else self._backoff(attempt)
                    self._paused_until = max(self._paused_until, time.monotonic() + delay)
                    self._rate_limited()
                    cause = f"HTTP 429 rate limit ({_message(response)})"
                elif status >= 500:
                    cause = f"HTTP {status} ({_message(response)})"
                else:
                    self.counters["errors"] += 1
                    hint = ""
                    if status in (401, 403):
                        hint = (f"; the key in ${self.ep.api_key_env} was refused" if self.ep.api_key_env
                                else "; the server wants a key: set teacher.endpoint.api_key_env")
                    raise RemoteTeacherError(f"{method} {url}: HTTP {status}: {_message(response)}{hint} "
                                             "(the request itself is refused, so it is not retried)")
            self.troubles += 1
            self.last_cause = cause
            if attempt >= self.ep.max_retries:
                self.counters["errors"] += 1
                kind = Unreachable if response is None else GaveUp
                raise kind(f"{method} {url}: gave up after {attempt + 1} attempts "
                           f"(teacher.endpoint.max_retries={self.ep.max_retries}); last: {cause}")
            attempt += 1
            self.counters["retries"] += 1
            await asyncio.sleep(delay if delay is not None else self._backoff(attempt - 1))

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter between half and all of the step."""
        step = min(self.ep.max_backoff_s, self.ep.backoff_s * 2 ** attempt)
        return step * (0.5 + 0.5 * self._random.random())

    def _succeeded(self, elapsed: float) -> None:
        self.counters["ok"] += 1
        self.latencies.append(elapsed)
        if self.k < self.ep.top_k:
            self._streak += 1
            if self._streak >= RESTORE_AFTER:
                self.k, self._streak = self.ep.top_k, 0

    def _rate_limited(self) -> None:
        self.k, self._streak = min(self.k, self.ep.min_top_k), 0

    # -- figures -------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Counters since the last snapshot, latency percentiles, current k and requests in flight."""

        async def take() -> dict[str, Any]:
            counters, latencies = dict(self.counters), sorted(self.latencies)
            for key in self.counters:
                self.counters[key] = 0
            self.latencies = []
            return {**counters, "latency_p50_s": _percentile(latencies, 0.5),
                    "latency_p95_s": _percentile(latencies, 0.95), "k": self.k, "in_flight": self.in_flight,
                    "max_in_flight": self.max_in_flight}

        return self.call(take())


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _message(response: httpx.Response) -> str:
    try:
        return server_error(response.json())
    except ValueError:
        return response.text[:300] or response.reason_phrase
