"""What the monitor knows about a run, built from telemetry events (schema v1, docs/telemetry.md).

Pure Python (no torch, no Textual): the app feeds events in from its reader thread and renders
snapshots; `--once` renders the same state as text. Reading rules implemented here:
- a `run_start` begins a new series (a resumed or restarted run replaces the old one's points);
- a step that goes backwards within a run (a resume from an earlier checkpoint) drops the points
  at and after it;
- every series keeps only its last `history` points, so a 100 MB file costs bounded memory.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

SERIES = ("loss_total", "loss_ce", "loss_kd", "samples_per_s", "tokens_per_s", "steps_per_s", "data_share",
          "mem_allocated", "mem_reserved", "mem_peak", "gpu_used", "gpu_util", "lr", "grad_norm", "alpha")
REMOTE_TOTALS = ("requests", "retries", "rate_limited", "errors", "cache_hits", "fetched", "wait_s")
END_STATUS = {"completed": "finished", "failed": "failed", "interrupted": "interrupted",
              "oom": "failed (out of memory)"}


@dataclass
class RunState:
    history: int = 600
    stall_after_s: float = 120.0
    name: str = "-"
    run_id: str | None = None
    status: str = "waiting"  # waiting, running, finished, failed, interrupted (stalled is derived)
    started_ts: float | None = None
    ended_ts: float | None = None
    last_event_wall: float | None = None  # time.time() when the last line was read
    config: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    estimate: dict[str, Any] | None = None
    soft_targets: dict[str, Any] | None = None  # {source, coverage}: teacher online, filling, or cached
    remote: dict[str, Any] | None = None  # the last step's remote_teacher figures (a teacher behind a server)
    remote_totals: dict[str, float] = field(default_factory=dict)  # requests, retries, 429s, ... since the start
    on_policy: dict[str, Any] | None = None  # the last step's on_policy figures (the student's own samples)
    on_policy_batches: int = 0  # on-policy micro-batches since the start (of the main process)
    step: int = 0
    epoch: float = 0.0
    samples: int = 0
    last: dict[str, Any] = field(default_factory=dict)  # the last step event
    series: dict[str, deque] = field(default_factory=dict)
    evals: deque = field(default_factory=lambda: deque(maxlen=200))
    log: deque = field(default_factory=lambda: deque(maxlen=200))  # (ts, kind, text)
    ooms: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    runs_seen: int = 0
    malformed: int = 0
    version: int = 0  # bumped by every applied event, so a view knows when to redraw

    def __post_init__(self) -> None:
        self.series = {name: deque(maxlen=self.history) for name in SERIES}

    # ------------------------------------------------------------------------------------------
    def apply(self, event: dict[str, Any], wall: float | None = None) -> None:
        self.last_event_wall = wall if wall is not None else time.time()
        self.version += 1
        handler = getattr(self, f"_on_{event.get('type')}", None)
        if handler is not None:
            try:
                handler(event)
            except (TypeError, ValueError, AttributeError, KeyError):
                self.malformed += 1  # well-formed JSON with the wrong shapes: count it, keep going

    def _on_run_start(self, e: dict[str, Any]) -> None:
        history, stall, seen, malformed = self.history, self.stall_after_s, self.runs_seen, self.malformed
        version, wall = self.version, self.last_event_wall
        self.__init__(history=history, stall_after_s=stall)  # a new series: forget the previous run
        self.runs_seen, self.malformed, self.version, self.last_event_wall = seen + 1, malformed, version, wall
        self.run_id = e.get("run_id")
        self.config = e.get("config") or {}
        self.name = (self.config.get("run") or {}).get("name") or "-"
        self.plan, self.env = e.get("plan") or {}, e.get("env") or {}
        self.params, self.estimate = e.get("params") or {}, e.get("estimate")
        self.soft_targets = e.get("soft_targets")
        self.step = e.get("step") or 0
        self.started_ts = e.get("ts")
        self.status = "running"
        resumed = e.get("resumed_from")
        self._note(e, "start", f"run started{f' (resumed from {resumed})' if resumed else ''}")

    def _on_step(self, e: dict[str, Any]) -> None:
        step = int(e["step"])
        if self.series["loss_total"] and step <= self.series["loss_total"][-1][0]:
            self._rewind(step)
        self.step, self.epoch, self.samples = step, float(e.get("epoch") or 0.0), int(e.get("samples") or 0)
        self.last = e
        cache = e.get("cache")
        if isinstance(cache, dict):
            self.soft_targets = {"source": cache.get("source"), "coverage": cache.get("covered") or {}}
        on_policy = e.get("on_policy")
        if isinstance(on_policy, dict):
            self.on_policy = on_policy
            self.on_policy_batches += int(on_policy.get("batches") or 0)
        remote = e.get("remote_teacher")
        if isinstance(remote, dict):
            self.remote = remote
            for key in REMOTE_TOTALS:
                self.remote_totals[key] = self.remote_totals.get(key, 0) + (remote.get(key) or 0)
        loss, rate, timing = e.get("loss") or {}, e.get("rate") or {}, e.get("time") or {}
        mem, gpu = e.get("mem") or {}, e.get("gpu") or {}
        data_share = None
        if timing.get("step_s"):
            data_share = (timing.get("data_s") or 0.0) / timing["step_s"]
        values = {"loss_total": loss.get("total"), "loss_ce": loss.get("ce"), "loss_kd": loss.get("kd"),
                  "samples_per_s": rate.get("samples_per_s"), "tokens_per_s": rate.get("tokens_per_s"),
                  "steps_per_s": rate.get("steps_per_s"),
                  "data_share": data_share, "mem_allocated": mem.get("allocated"),
                  "mem_reserved": mem.get("reserved"), "mem_peak": mem.get("peak_allocated"),
                  "gpu_used": gpu.get("used_bytes"), "gpu_util": gpu.get("util_pct"), "lr": e.get("lr"),
                  "grad_norm": e.get("grad_norm"), "alpha": e.get("alpha")}
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self.series[name].append((step, float(value)))

    def _rewind(self, step: int) -> None:
        for points in self.series.values():
            while points and points[-1][0] >= step:
                points.pop()
        while self.evals and self.evals[-1]["step"] >= step:
            self.evals.pop()

    def _on_eval(self, e: dict[str, Any]) -> None:
        self.evals.append({"step": e.get("step"), "split": e.get("split"), **(e.get("metrics") or {})})

    def _on_checkpoint(self, e: dict[str, Any]) -> None:
        self._note(e, "checkpoint", f"{e.get('kind')} checkpoint: {e.get('path')} ({_secs(e.get('duration_s'))})")

    def _on_warning(self, e: dict[str, Any]) -> None:
        self._note(e, "warning", f"[{e.get('code')}] {e.get('message')}")

    def _on_oom(self, e: dict[str, Any]) -> None:
        self.ooms.append(e)
        outcome = "recovered" if e.get("recovered") else "not recovered"
        self._note(e, "oom", f"out of memory in {e.get('phase')} ({outcome}): {e.get('message')}")

    def _on_run_end(self, e: dict[str, Any]) -> None:
        self.end = e
        self.ended_ts = e.get("ts")
        self.status = END_STATUS.get(e.get("status"), str(e.get("status")))
        error = e.get("error")
        self._note(e, "end", f"run {e.get('status')} after {_secs(e.get('duration_s'))}"
                             + (f": {error}" if error else ""))

    def _note(self, e: dict[str, Any], kind: str, text: str) -> None:
        self.log.append((e.get("ts"), kind, text))

    def snapshot(self) -> "RunState":
        """A copy whose containers the reader thread will not touch while a view renders it."""
        snap = copy.copy(self)
        snap.series = {name: deque(points, maxlen=points.maxlen) for name, points in self.series.items()}
        snap.evals, snap.log = deque(self.evals, maxlen=self.evals.maxlen), deque(self.log, maxlen=self.log.maxlen)
        snap.ooms = list(self.ooms)
        return snap

    # ------------------------------------------------------------------------------------------
    def shown_status(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.status == "running" and self.last_event_wall and now - self.last_event_wall > self.stall_after_s:
            return "stalled"
        return self.status

    @property
    def rate_unit(self) -> str:
        """What throughput counts: tokens for a language-model run (data.modality: causal_lm), else samples."""
        return "tokens" if (self.config.get("data") or {}).get("modality") == "causal_lm" else "samples"

    @property
    def total_steps(self) -> int | None:
        return self.plan.get("total_steps")

    @property
    def budget_bytes(self) -> int | None:
        return self.plan.get("vram_budget_bytes")

    def status_text(self, now: float | None = None) -> str:
        """The shown status, with how long ago the last line came when the run has gone quiet."""
        now = time.time() if now is None else now
        status = self.shown_status(now)
        if status == "stalled":
            status += f" (no new line for {fmt_duration(now - self.last_event_wall)})"
        return status

    def elapsed(self, now: float | None = None) -> float | None:
        """Run time so far: up to run_end, or to the last line of a run that has gone quiet."""
        if self.started_ts is None:
            return None
        now = time.time() if now is None else now
        end = self.ended_ts or (self.last_event_wall if self.shown_status(now) == "stalled" else now)
        return max(0.0, end - self.started_ts)

    def eta(self, now: float | None = None) -> float | None:
        rates = self.series["steps_per_s"]
        if self.shown_status(now) != "running" or not rates or not self.total_steps:
            return None
        recent = [v for _, v in list(rates)[-5:] if v > 0]
        if not recent:
            return None
        return max(0, self.total_steps - self.step) / (sum(recent) / len(recent))

    def latest(self, name: str) -> float | None:
        points = self.series[name]
        return points[-1][1] if points else None

    def values(self, name: str) -> list[float]:
        return [v for _, v in self.series[name]]

    def vram_used(self) -> float | None:
        """The most complete reading: NVML device use if present, else PyTorch's reserved bytes."""
        return self.latest("gpu_used") or self.latest("mem_reserved")


def _secs(value: Any) -> str:
    return f"{value:.1f} s" if isinstance(value, (int, float)) else "-"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    days, seconds = divmod(int(seconds), 86400)
    hours, rest = divmod(seconds, 3600)
    clock = f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours or days else f"{rest // 60:02d}:{rest % 60:02d}"
    return f"{days} d {clock}" if days else clock


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e9:.2f} GB" if value >= 1e8 else f"{value / 1e6:.0f} MB"


def fmt_num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def teacher_text(state: RunState) -> str | None:
    """Where soft targets come from: "teacher: cached 85000/85000" (no teacher in memory), the fill's
    progress while the first epoch stores them, or "online"; None without distillation."""
    targets = state.soft_targets
    if not targets:
        return None
    if targets.get("source") == "teacher":
        return "teacher: online (a forward on every batch)"
    if targets.get("source") == "remote":
        mode = targets.get("mode")
        how = f" ({mode}{', ' + targets['api'] if mode == 'generate' and targets.get('api') else ''})" if mode else ""
        return f"teacher: remote {targets.get('model')} at {targets.get('url')}{how}" + (
            " (offline: cached answers only)" if targets.get("offline") else "")
    coverage = targets.get("coverage") or {}
    done = sum(int(n) for n, _ in coverage.values())
    total = sum(int(t) for _, t in coverage.values())
    if targets.get("source") == "cache":
        return f"teacher: cached {done}/{total} (not in memory)"
    views = [v for key, v in coverage.items() if key.startswith("train@")]  # augment.views: one entry per view
    if views:
        train = f"train {sum(int(n) for n, _ in views)}/{sum(int(t) for _, t in views)} in {len(views)} views"
    else:
        train = f"train {'/'.join(map(str, coverage.get('train', ['?', '?'])))}"
    return f"teacher: filling the cache {done}/{total} ({train})"


def remote_text(state: RunState) -> str | None:
    """A remote teacher's figures: requests, retries and rate limits so far; latency, k, what is in
    flight and how long the loop waited, from the last step line. None for other teachers."""
    r, t = state.remote, state.remote_totals
    if r is None:
        return None
    seen = t.get("cache_hits", 0) + t.get("fetched", 0)
    hit = f"{100 * t.get('cache_hits', 0) / seen:.0f}%" if seen else "-"
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f} ms"  # noqa: E731
    return (f"requests {int(t.get('requests', 0))}  retries {int(t.get('retries', 0))}  rate-limited "
            f"{int(t.get('rate_limited', 0))}  cache hits {hit}\n"
            f"latency p50 {ms(r.get('latency_p50_s'))} p95 {ms(r.get('latency_p95_s'))}  k {r.get('k', '-')}  "
            f"in flight {r.get('in_flight', '-')}  queue {r.get('queue', '-')}  loop waited "
            f"{t.get('wait_s', 0.0):.1f} s")


def on_policy_text(state: RunState) -> str | None:
    """On-policy distillation's figures from the last step line: the share of micro-batches the
    student sampled, its sampling speed and sample length, the teacher's scoring time. None without it."""
    op = state.on_policy
    if op is None:
        return None
    ms = op.get("score_s_per_batch")
    return (f"on-policy: {100 * (op.get('share') or 0):.0f}% of batches sampled ({state.on_policy_batches} so far), "
            f"{fmt_num(op.get('generated_tokens_per_s'), 4)} sampled tokens/s, mean sample "
            f"{fmt_num(op.get('mean_sample_tokens'), 3)} tokens, teacher scoring "
            f"{'-' if ms is None else f'{1000 * ms:.0f} ms'} per batch")


def perplexity_text(e: dict[str, Any], prefix: str = "") -> str:
    """ "perplexity 95.4 (teacher 12.3)" for a language model's eval, "" for a classifier's."""
    if e.get("perplexity") is None:
        return ""
    teacher = e.get("teacher_perplexity")
    shown = f"{prefix}perplexity {fmt_num(e['perplexity'], 4)}"
    return shown + (f" (teacher {fmt_num(teacher, 4)})" if teacher else "")


def summary_text(state: RunState, now: float | None = None) -> str:
    """The plain-text view used by `monitor_tui.py --once`."""
    lines = []
    total = state.total_steps
    lines.append(f"run {state.name} [{state.status_text(now)}] step {state.step}/{total or '?'} "
                 f"epoch {state.epoch:.2f} elapsed {fmt_duration(state.elapsed(now))} "
                 f"ETA {fmt_duration(state.eta(now))}")
    budget = state.budget_bytes
    used = state.vram_used()
    if used is not None:
        share = f" ({100 * used / budget:.0f}% of budget)" if budget else ""
        lines.append(f"VRAM {fmt_bytes(used)} of {fmt_bytes(budget)}{share}; allocated "
                     f"{fmt_bytes(state.latest('mem_allocated'))}, peak {fmt_bytes(state.latest('mem_peak'))}")
    else:
        lines.append(f"VRAM: no GPU readings (CPU run or no NVML); budget {fmt_bytes(budget)}")
    if state.estimate and state.estimate.get("total"):
        lines.append(f"pre-flight estimate {fmt_bytes(state.estimate['total'])}")
    if teacher_text(state):
        lines.append(teacher_text(state))
    if remote_text(state):
        lines.extend("remote teacher: " + line for line in remote_text(state).splitlines())
    share = state.latest("data_share")
    unit = state.rate_unit
    lines.append(f"throughput {fmt_num(state.latest(f'{unit}_per_s'), 4)} {unit}/s, "
                 f"{fmt_num(state.latest('steps_per_s'), 3)} steps/s"
                 + (f", {100 * share:.0f}% of step time waiting for data" if share is not None else ""))
    lines.append(f"loss total {fmt_num(state.latest('loss_total'))} ce {fmt_num(state.latest('loss_ce'))} "
                 f"kd {fmt_num(state.latest('loss_kd'))} alpha {fmt_num(state.latest('alpha'), 3)} "
                 f"lr {fmt_num(state.latest('lr'), 3)} grad_norm {fmt_num(state.latest('grad_norm'), 3)}")
    if sampled := on_policy_text(state):
        lines.append(sampled)
    if state.evals:
        e = state.evals[-1]
        lines.append(f"eval @ step {e['step']} ({e['split']}): student acc {fmt_num(e.get('student_acc'), 4)}, "
                     f"F1 {fmt_num(e.get('student_f1'), 4)}, teacher acc {fmt_num(e.get('teacher_acc'), 4)}, "
                     f"agreement {fmt_num(e.get('agreement'), 4)}" + perplexity_text(e, ", "))
    for oom in state.ooms:
        lines.append(f"OOM at step {oom.get('step')} in {oom.get('phase')}: "
                     f"{'recovered' if oom.get('recovered') else 'NOT recovered'}; {oom.get('message')}")
        lines.extend(f"  advice: {a}" for a in oom.get("advice") or [])
    if state.end and state.end.get("error"):
        lines.append(f"error: {state.end['error']}")
    if state.malformed:
        lines.append(f"({state.malformed} malformed telemetry lines skipped)")
    return "\n".join(lines)
