"""The Textual monitor: follows a telemetry file and shows the run's state.

A thread worker first catches up with the existing file (kd.telemetry.load_history parses only the
lines the views can show), then reads new complete lines as they arrive and applies them to a
RunState under a lock; the UI re-renders from a snapshot of that state on a timer. File reading and
JSON parsing never run on the UI thread.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.widgets import DataTable, Footer, Label, RichLog, Sparkline, Static
from textual.worker import get_current_worker

from kd.telemetry import TelemetryTailer, load_history
from kd.tui.state import RunState, fmt_bytes, fmt_duration, fmt_num, on_policy_text, remote_text, teacher_text

CHUNK_BYTES = 4 * 2**20  # read at most this much per pass: history arrives in slices, the UI keeps up
STATUS_STYLE = {"running": "bold green", "finished": "bold cyan", "stalled": "bold yellow", "waiting": "dim",
                "interrupted": "bold yellow"}
HELP = ("q quit · p pause/resume following · d dismiss the OOM banner · ? this help\n"
        "VRAM bar: device use (NVML, else PyTorch reserved) against memory.vram_budget_gb; "
        "green < 80%, yellow < 95%, red above.")


def labelled_sparkline(label: str, spark_id: str):
    """A one-line row: a short name, then the sparkline filling the rest."""
    with Horizontal(classes="sparkrow"):
        yield Label(label, classes="sparklabel")
        yield Sparkline([], id=spark_id)


def usage_bar(used: float | None, budget: float | None, width: int = 28) -> Text:
    if used is None or not budget:
        return Text("no GPU readings" if used is None else fmt_bytes(used), style="dim")
    share = used / budget
    style = "green" if share < 0.8 else "yellow" if share < 0.95 else "bold red"
    filled = min(width, int(round(share * width)))
    bar = Text("█" * filled, style=style) + Text("░" * (width - filled), style="dim")
    return bar + Text(f" {fmt_bytes(used)} / {fmt_bytes(budget)} ({100 * share:.0f}%)", style=style)


class MonitorApp(App):
    CSS = """
    Screen { layout: vertical; }
    #title { height: auto; max-height: 2; background: $boost; padding: 0 1; }
    #oom { display: none; background: $error; color: $text; padding: 0 1; height: auto; }
    #oom.shown { display: block; }
    #panels { grid-size: 2; grid-gutter: 0 1; height: auto; padding: 0 1; }
    .panel { height: auto; border: round $primary-darken-2; padding: 0 1; }
    #remote_panel { column-span: 2; display: none; }
    #remote_panel.shown { display: block; }
    .sparkrow { height: 1; }
    .sparklabel { width: 10; color: $text-muted; }
    .panel Sparkline { height: 1; margin: 0; width: 1fr; }
    Screen.tall .sparkrow { height: 3; }
    Screen.tall .panel Sparkline { height: 3; }
    #bottom { grid-size: 2; grid-columns: 2fr 1fr; grid-gutter: 0 1; height: 1fr; padding: 0 1; }
    #evals, #events { border: round $primary-darken-2; height: 1fr; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("p", "toggle_pause", "Pause/resume"),
        Binding("d", "dismiss_oom", "Dismiss OOM"),
        Binding("question_mark", "help", "Help", key_display="?"),
    ]

    def __init__(self, path: Path, stall_after_s: float = 120.0, history: int = 600, poll_s: float = 0.5):
        super().__init__()
        self.path = path
        self.poll_s = poll_s
        self.state = RunState(history=history, stall_after_s=stall_after_s)
        self.lock = threading.Lock()
        self.paused = False
        self.oom_seen = 0
        self._shown_evals = 0
        self._shown_log = 0
        self._series_id: str | None = None
        self._rendered_version = -1
        self._shown: RunState | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        yield Static(id="oom")
        with Grid(id="panels"):
            with Vertical(classes="panel", id="vram_panel"):
                yield Static(id="vram")
                yield from labelled_sparkline("in use", "vram_spark")
            with Vertical(classes="panel", id="rate_panel"):
                yield Static(id="rate")
                yield from labelled_sparkline("samples/s", "rate_spark")  # tokens/s for language models
                yield from labelled_sparkline("steps/s", "steps_spark")
            with Vertical(classes="panel", id="loss_panel"):
                yield Static(id="loss")
                yield from labelled_sparkline("total", "loss_spark")
                yield from labelled_sparkline("ce", "ce_spark")
                yield from labelled_sparkline("kd", "kd_spark")
            with Vertical(classes="panel", id="gpu_panel"):
                yield Static(id="gpu")
            with Vertical(classes="panel", id="remote_panel"):  # shown for a teacher behind a server
                yield Static(id="remote")
        with Grid(id="bottom"):
            yield DataTable(id="evals", show_cursor=False, zebra_stripes=True)
            yield RichLog(id="events", wrap=True, markup=False, max_lines=500, min_width=20)
        yield Footer()

    def on_resize(self) -> None:
        # Tall terminals (40+ rows) get 3-row sparklines; 24-row ones keep everything on one screen.
        self.screen.set_class(self.size.height >= 40, "tall")

    def on_mount(self) -> None:
        self.title = "kd monitor"
        table = self.query_one("#evals", DataTable)
        table.border_title = "evaluation"
        table.add_columns("step", "split", "acc", "F1", "teach", "agree", "loss", "ppl")
        self.query_one("#events", RichLog).border_title = "events"
        for panel, title in (("vram_panel", "VRAM"), ("rate_panel", "throughput"), ("loss_panel", "losses"),
                             ("gpu_panel", "GPU"), ("remote_panel", "remote teacher")):
            self.query_one(f"#{panel}").border_title = title
        self.follow()
        self._timer = self.set_interval(self.poll_s, self.render_state)
        self.render_state()

    def on_unmount(self) -> None:
        self._timer.stop()

    # ------------------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, name="telemetry-reader")
    def follow(self) -> None:
        tailer = TelemetryTailer(self.path)
        worker = get_current_worker()
        history = load_history(tailer, keep_steps=self.state.history)  # bounded work, however big the file
        with self.lock:
            wall = tailer.mtime or time.time()  # an old, cut file is stale from the start
            for event in history:
                self.state.apply(event, wall)
        while not worker.is_cancelled:
            if self.paused:
                time.sleep(self.poll_s)
                continue
            events = tailer.read_new(max_bytes=CHUNK_BYTES)
            with self.lock:
                if tailer.reset:  # the file was truncated or replaced: start over
                    tailer.reset = False
                    self.state = RunState(history=self.state.history, stall_after_s=self.state.stall_after_s)
                wall = tailer.mtime or time.time()
                for event in events:
                    self.state.apply(event, wall)
                self.state.malformed = max(self.state.malformed, tailer.malformed)
            if not events:
                time.sleep(self.poll_s)

    # ------------------------------------------------------------------------------------------
    def render_state(self) -> None:
        if not self.query("#title"):  # shutting down: the widgets are already gone
            return
        with self.lock:  # hold the lock only to copy: the reader must not wait for the screen
            changed = self.state.version != self._rendered_version
            s = self.state.snapshot() if changed else self._shown
            self._rendered_version = self.state.version
        if s is None:
            s = self._shown = self.state.snapshot()
        self._render_title(s)  # elapsed, ETA and stall move with the clock
        if not changed:
            return
        self._shown = s
        if s.run_id != self._series_id:  # a new run_start: new series in the tables too
            self._series_id = s.run_id
            self.query_one("#evals", DataTable).clear()
            self.query_one("#events", RichLog).clear()
            self._shown_evals = self._shown_log = 0
        self._render_oom(s)
        self._render_panels(s)
        self._render_tables(s)

    def _render_title(self, s: RunState) -> None:
        status = s.status_text()
        if self.paused:
            status += " (paused)"
        # Two lines, each within 100 columns: where the run is, then its clock and its teacher.
        title = Text.assemble(
            (f"{s.name}  ", "bold"), (f"● {status}", STATUS_STYLE.get(s.shown_status(), "bold red")),
            f"  step {s.step}/{s.total_steps or '?'}  epoch {s.epoch:.2f}",
            f"\nelapsed {fmt_duration(s.elapsed())}  ETA {fmt_duration(s.eta())}")
        if teacher_text(s):
            title.append(f"  {teacher_text(s)}", style="dim")
        if s.status == "waiting":
            title = Text(f"waiting for {self.path} ...", style="dim")
        self.query_one("#title", Static).update(title)

    def _render_oom(self, s: RunState) -> None:
        banner = self.query_one("#oom", Static)
        if len(s.ooms) > self.oom_seen:
            last = s.ooms[-1]
            outcome = "recovered" if last.get("recovered") else "NOT recovered"
            lines = [f"OUT OF MEMORY at step {last.get('step')} in {last.get('phase')} ({outcome}): "
                     f"{last.get('message')}"]
            if last.get("new_micro_batch"):
                lines.append(f"micro-batch {last.get('micro_batch')} -> {last.get('new_micro_batch')}, "
                             f"accumulation {last.get('grad_accum')} -> {last.get('new_grad_accum')}")
            lines += [f"• {a}" for a in last.get("advice") or []]
            lines.append("(d to dismiss)")
            banner.update("\n".join(lines))
            banner.add_class("shown")
        elif not s.ooms:
            banner.remove_class("shown")

    def _render_panels(self, s: RunState) -> None:
        vram = Text.assemble(usage_bar(s.vram_used(), s.budget_bytes), "\n",
                             f"alloc {fmt_bytes(s.latest('mem_allocated'))}  reserved "
                             f"{fmt_bytes(s.latest('mem_reserved'))}  peak {fmt_bytes(s.latest('mem_peak'))}")
        if s.estimate and s.estimate.get("total"):
            vram.append(f"\nestimate {fmt_bytes(s.estimate['total'])} vs peak {fmt_bytes(s.latest('mem_peak'))}")
        phases = s.last.get("memory") or {}
        if phases:
            short = {"generate": "sampling", "teacher_forward": "teacher", "student_forward": "student",
                     "backward": "backward", "optimizer": "optim", "eval": "eval"}
            vram.append("\npeaks: " + "  ".join(f"{short.get(p, p)} {fmt_bytes(v.get('allocated'))}"
                                               for p, v in phases.items() if isinstance(v, dict)))
        self.query_one("#vram", Static).update(vram)
        self._spark("#vram_spark", s.values("gpu_used") or s.values("mem_reserved"))
        share, unit = s.latest("data_share"), s.rate_unit
        self.query_one("#rate", Static).update(
            f"{fmt_num(s.latest(f'{unit}_per_s'), 4)} {unit}/s  {fmt_num(s.latest('steps_per_s'), 3)} steps/s\n"
            f"waiting for data: {'-' if share is None else f'{100 * share:.0f}%'} of step time")
        self._spark("#rate_spark", s.values(f"{unit}_per_s"))
        self.query_one("#rate_spark").parent.query_one(Label).update(f"{unit}/s")
        self._spark("#steps_spark", s.values("steps_per_s"))
        self.query_one("#loss", Static).update(
            f"total {fmt_num(s.latest('loss_total'))}  ce {fmt_num(s.latest('loss_ce'))}  "
            f"kd {fmt_num(s.latest('loss_kd'))}\nalpha {fmt_num(s.latest('alpha'), 3)}  "
            f"lr {fmt_num(s.latest('lr'), 3)}  grad {fmt_num(s.latest('grad_norm'), 3)}"
            + (f"\n{sampled}" if (sampled := on_policy_text(s)) else ""))
        self._spark("#loss_spark", s.values("loss_total"))
        self._spark("#ce_spark", s.values("loss_ce"))
        self._spark("#kd_spark", s.values("loss_kd") if any(s.values("loss_kd")) else [])
        gpu = s.last.get("gpu") or {}
        if gpu:
            text = (f"util {fmt_num(gpu.get('util_pct'), 3)}%  temp {fmt_num(gpu.get('temp_c'), 3)} °C\n"
                    f"power {fmt_num(gpu.get('power_w'), 4)} / {fmt_num(gpu.get('power_limit_w'), 4)} W")
        else:
            device = s.env.get("gpu_name") or s.env.get("device") or "-"
            text = f"{device}\nno NVML readings in telemetry"
        self.query_one("#gpu", Static).update(text)
        remote = remote_text(s)
        self.query_one("#remote_panel").set_class(remote is not None, "shown")
        if remote is not None:
            self.query_one("#remote", Static).update(remote)

    def _spark(self, selector: str, values: list[float]) -> None:
        """A sparkline with no data (no GPU readings, KD off) is hidden with its label, not drawn flat."""
        spark = self.query_one(selector, Sparkline)
        spark.parent.display = bool(values)
        spark.data = values

    def _render_tables(self, s: RunState) -> None:
        table = self.query_one("#evals", DataTable)
        evals = list(s.evals)
        if len(evals) < self._shown_evals:  # a rewind removed rows
            table.clear()
            self._shown_evals = 0
        for e in evals[self._shown_evals:]:
            split = {"validation": "val", "train": "train", "test": "test"}.get(str(e["split"]), str(e["split"]))
            table.add_row(str(e["step"]), split, _pct(e.get("student_acc")), _pct(e.get("student_f1")),
                          _pct(e.get("teacher_acc")), _pct(e.get("agreement")), fmt_num(e.get("loss"), 4),
                          fmt_num(e.get("perplexity"), 4))
        self._shown_evals = len(evals)
        log = self.query_one("#events", RichLog)
        entries = list(s.log)
        for ts, kind, text in entries[self._shown_log:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, (int, float)) else "--:--:--"
            style = {"oom": "bold red", "warning": "yellow", "end": "bold cyan"}.get(kind, "")
            if kind == "end" and s.status not in ("finished",):
                style = "bold red" if "fail" in s.status else "bold yellow"
            log.write(Text(f"{stamp} {text}", style=style))
        self._shown_log = len(entries)

    # ------------------------------------------------------------------------------------------
    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        self.notify("following paused" if self.paused else "following resumed", timeout=2)
        self.render_state()

    def action_dismiss_oom(self) -> None:
        self.oom_seen = len(self.state.ooms)
        self.query_one("#oom", Static).remove_class("shown")

    def action_help(self) -> None:
        self.notify(HELP, title="keys", timeout=8)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
