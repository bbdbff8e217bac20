"""Every CUDA path of the kit, checked by one command, with one report (markdown + JSON).

    make gpu-check                                   # on a machine with the project's .venv
    python bench/gpu_check.py --out bench/gpu-check  # anywhere the stack is importable

In order, each step a subprocess with its own time limit and log file under --out:

  1. cuda-tests    pytest -m cuda: fast-path switches, the budget cap, a real out-of-memory error in
                   every phase, NVML fields, fp16/bf16, on-device features, compile (tests/test_cuda.py);
                   configs/5gb.yaml end to end against the published layouts on 127.0.0.1 (tests/test_flagship.py);
                   a LoRA language-model student at 512 tokens under the 5.5 GB cap, both estimates against
                   the measured peak
  2. memory        bench/bench_memory.py: pre-flight estimate against measured peaks (demo, flagship,
                   with each phase's peak) and a real out-of-memory recovery
  3. throughput    bench/bench_throughput.py: naive against optimised, KD step cost
  4. utilisation   bench_throughput.py --utilisation-only 600: GPU utilisation in telemetry over a
                   steady half minute of the flagship as shipped (GPU only; skipped elsewhere)
  5. cache         bench/bench_cache.py: the soft-target cache against online KD
  6. demo          `python -m kd.demo` (the `make demo` run, under the configs' 5.5 GB cap)
  7. monitor-once  the monitor's `--once` summary of the demo's KD run's telemetry
  8. agreement     the demo teacher just trained, in fp16 and bf16 against fp32 on the demo test set
  9. stem          bench/bench_stem.py: the log-mel CNN's training step with stem_stride 1 against 2

Before any step, the pinned requirements of setup.cfg are looked up: one the machine lacks stops the
check at once, naming the line to add to .gpu/wheels.txt (a missing dev extra is only a warning).

Without a GPU the steps still run their CPU parts (the CUDA tests skip with a reason; the benches
inject the out-of-memory error), and the report says that no GPU figure was measured. Nothing here
needs the network: the flagship teacher is an AST built from its config with random weights.
"""

from __future__ import annotations

import argparse
import configparser
import datetime
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kd.atomic import atomic_file  # noqa: E402

from workloads import ROOT, save_results  # noqa: E402  (puts the repository on the path)

PY = sys.executable
SKIPPED = "skipped (no GPU)"  # the exit recorded for a GPU-only step on a machine without one


def steps(out: Path, work: Path) -> list[dict]:
    return [
        {"name": "cuda-tests", "timeout": 900,
         "argv": [PY, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
                  "tests/test_flagship.py", f"--junitxml={out / 'cuda-tests.xml'}"]},
        {"name": "memory", "timeout": 900,
         "argv": [PY, "bench/bench_memory.py", "--out", str(out / "memory.json"), "--work-dir", str(work / "memory")]},
        {"name": "throughput", "timeout": 1200,
         "argv": [PY, "bench/bench_throughput.py", "--out", str(out / "throughput.json"),
                  "--work-dir", str(work / "throughput")]},
        {"name": "utilisation", "timeout": 600,
         "argv": [PY, "bench/bench_throughput.py", "--utilisation-only", "600", "--out", str(out / "utilisation.json"),
                  "--work-dir", str(work / "utilisation")], "gpu_only": True},
        {"name": "cache", "timeout": 900, "argv": [PY, "bench/bench_cache.py", "--json", str(out / "cache.json")]},
        {"name": "demo", "timeout": 900, "argv": [PY, "-m", "kd.demo"]},
        {"name": "monitor-once", "timeout": 60, "argv": [PY, "monitor_tui.py", "runs/demo-kd", "--once"]},
        {"name": "agreement", "timeout": 300,
         "argv": [PY, "bench/bench_throughput.py", "--agreement-only", "--out", str(out / "agreement.json"),
                  "--work-dir", str(work / "agreement")]},
        {"name": "stem", "timeout": 300, "argv": [PY, "bench/bench_stem.py", "--out", str(out / "stem")]},
    ]


def environment() -> dict:
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": sys.version.split()[0], "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "gpu": None, "driver": None, "gpu_total_bytes": None}
    for name in ("transformers", "accelerate", "datasets", "textual", "pynvml"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "installed")
        except ImportError:
            env[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"], env["gpu_total_bytes"] = props.name, props.total_memory
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception as exc:  # NVML missing or refused: say so rather than fail the report
            env["driver"] = f"unknown ({type(exc).__name__})"
    return env


def run_step(step: dict, out: Path) -> dict:
    log = out / f"{step['name']}.log"
    started = time.time()
    print(f"== {step['name']}: {' '.join(Path(a).name if a == PY else a for a in step['argv'])}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    with log.open("w") as fh:
        try:
            code = subprocess.call(step["argv"], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                   timeout=step["timeout"])
        except subprocess.TimeoutExpired:
            code = "timeout"
    text = log.read_text(errors="replace")
    result = {"name": step["name"], "exit": code, "seconds": round(time.time() - started, 1), "log": log.name,
              "tail": text.strip().splitlines()[-25:]}
    print(f"   exit {code} in {result['seconds']} s; log {log}", flush=True)
    return result


def markdown(env: dict, results: list[dict], out: Path) -> str:
    lines = ["# GPU check", "",
             f"{env['date']}: GPU {env['gpu'] or 'none (no CUDA device: no GPU figure was measured)'}, "
             f"driver {env['driver']}, torch {env['torch']} (CUDA {env['cuda_runtime']}), python {env['python']}, "
             f"transformers {env['transformers']}, accelerate {env['accelerate']}, datasets {env['datasets']}, "
             f"textual {env['textual']}.", "",
             "| step | exit | seconds |", "| --- | --- | --- |"]
    lines += [f"| {r['name']} | {r['exit']} | {r['seconds']} |" for r in results]
    for r in results:
        if r["tail"]:
            lines += ["", f"## {r['name']}", "", "```", *r["tail"], "```"]
    for name in ("memory.json", "throughput.json", "utilisation.json", "cache.json", "agreement.json",
                 "stem/results.json"):
        if (out / name).is_file():
            lines += ["", f"Full figures: `{name}`."]
    return "\n".join(lines) + "\n"


def missing_requirements(setup_cfg: Path, extras: tuple[str, ...] = ("dev",)) -> list[str]:
    """The pinned requirements (install_requires and `extras` of setup.cfg) whose distribution is not
    installed here, as `name==version` lines. Only presence counts: a GPU machine brings its own torch."""
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    lines = config["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += config["options.extras_require"].get(extra, "").splitlines()
    missing = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        name = re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0]
        if not name:
            continue
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu-check", help="report folder")
    names = [s["name"] for s in steps(Path(), Path())]
    # choices: a misspelt step is refused at once (on a lent GPU, a run that checks nothing wastes its time)
    parser.add_argument("--only", nargs="+", default=None, choices=names, metavar="STEP",
                        help=f"run only these steps (always in this order): {', '.join(names)}")
    args = parser.parse_args()
    # Found in a second, not after minutes of lent GPU time. The kit imports what install_requires
    # lists, so a gap there fails every step; a missing dev extra (onnx, gguf, ...) fails only its tests.
    needed = missing_requirements(ROOT / "setup.cfg", extras=())
    optional = [r for r in missing_requirements(ROOT / "setup.cfg") if r not in needed]
    fix = ("add these lines to .gpu/wheels.txt and run `bash ../shared/gpu/wheelhouse.sh` again "
           "(../shared/gpu/README.md)")
    if optional:
        print(f"warning: not installed here: {', '.join(optional)} (tests that use them will fail); {fix}")
    if needed:
        print(f"error: not installed here: {', '.join(needed)}; {fix}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"GPU check: {env['gpu'] or 'no CUDA GPU (CPU parts only)'}; torch {env['torch']}; report in {args.out}")
    # The benches' runs (checkpoints, caches, telemetry) are scratch: only their figures go to --out.
    with tempfile.TemporaryDirectory(prefix="kd-gpu-check-") as work:
        results = run_steps(args, env, Path(work))
    failed = [r["name"] for r in results if r["exit"] not in (0, SKIPPED)]
    print(f"GPU check done: {len(results) - len(failed)}/{len(results)} steps passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def run_steps(args: argparse.Namespace, env: dict, work: Path) -> list[dict]:
    chosen = [s for s in steps(args.out, work) if args.only is None or s["name"] in args.only]
    results = []
    for step in chosen:
        if step.get("gpu_only") and not env["gpu"]:
            print(f"== {step['name']}: skipped, it measures a GPU", flush=True)
            results.append({"name": step["name"], "exit": SKIPPED, "seconds": 0, "log": None, "tail": []})
        else:
            results.append(run_step(step, args.out))
        # Rewritten after each step, atomically: a run cut by a time limit keeps what it did, whole.
        save_results({"env": env, "steps": results}, args.out / "gpu_report.json")
        with atomic_file(args.out / "gpu_report.md") as tmp:
            tmp.write_text(markdown(env, results, args.out))
    return results


if __name__ == "__main__":
    sys.exit(main())
