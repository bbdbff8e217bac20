"""A pretrained student distilled further: LoRA against full fine-tuning against CE only, with the
pre-flight's memory estimate next to the peak the PyTorch profiler measures.

    python bench/bench_lora.py                          # about 40 min on 2 CPU cores (pretraining included)
    python bench/bench_lora.py --steps 60 --out bench/lora

1. The pretrained student: the 4-layer SmolLM2 student that `make demo-llm` trains (teacher blocks
   0, 10, 20, 29, 150 steps of KD; reused from .bench/runs/llm-kd when it is there).
2. From it (`student.model`), the same further steps on the same rows, three ways:
   `lora_kd` (LoRA rank 16 on q_proj/v_proj, KD from the SmolLM2-135M teacher, lr 1e-3),
   `full_kd` (every weight, KD, lr 2e-4), `full_ce` (every weight, CE only, lr 2e-4).
   Each at its usual learning rate: adapters start at zero and take a larger one.
3. Test perplexity and top-1 agreement with the teacher on modules never trained on
   (bench_llm.evaluate, the same rows for every model), train tokens/s from the telemetry.
4. Memory: each setting again in a fresh process for 3 steps under the PyTorch profiler
   (`profile_memory`, the memory timeline by category: parameters, gradients, optimizer state,
   activations...), its peak next to the pre-flight's estimate (CPU: analytic; the estimate's
   CUDA context is left out, a CPU has none).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from bench_llm import WORK, evaluate, summarise, teacher_folder, train, write_corpus

from workloads import ROOT, environment, print_environment, save_results

SETTINGS = {
    "lora_kd": (True, 1e-3, ("student.lora.rank=16", "student.lora.alpha=32", "student.lora.dropout=0.05")),
    "full_kd": (True, 2e-4, ()),
    "full_ce": (False, 2e-4, ()),
}
LABELS = {"pretrained": "pretrained student (start)", "lora_kd": "LoRA r16, KD", "full_kd": "every weight, KD",
          "full_ce": "every weight, CE only"}


def from_pretrained(student: Path) -> tuple[str, ...]:
    """Overrides that make the run start from the pretrained student instead of teacher layers."""
    return (f"student.model={student}", "student.init_from_teacher=false", "student.teacher_layers=null")


def measure_peak(name: str, student: Path, corpus: Path, args) -> dict:
    """In this process: build the run and train 3 steps under the profiler; the memory timeline's peak
    (the sum over categories at its highest point) and the pre-flight estimate."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    from kd.build import build_run
    from kd.config import load_config
    from kd.trainer import Trainer

    distil, lr, extra = SETTINGS[name]
    out = WORK / "runs" / f"lora-bench-peak-{name}"
    overrides = [f"run.output_dir={out}", "run.overwrite=true", "data.dataset=json", f"data.data_dir={corpus}",
                 "data.eval_split=null", "data.test_split=null", f"data.max_length={args.seq}",
                 f"teacher.model={teacher_folder()}", "student.type=hf", *from_pretrained(student), *extra,
                 f"distillation.enabled={str(distil).lower()}", f"train.batch_size={args.batch}", "train.epochs=null",
                 "train.max_steps=3", f"train.lr={lr}", "telemetry.log_every=1", "export.onnx=false"]
    cfg = load_config(ROOT / "configs" / "smollm2_kd.yaml", overrides)
    from kd.run_folder import claim

    claim(cfg, resuming=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        run = build_run(cfg)
        Trainer(run).fit()
    timeline = MemoryProfileTimeline(prof._memory_profile())
    _, sizes = timeline._coalesce_timeline(torch.device("cpu"))
    totals = np.asarray(sizes).sum(axis=1)
    estimate = run.estimate
    return {"peak_bytes": int(totals.max()), "estimate_bytes": int(estimate.total - estimate.cuda_context),
            "estimate": estimate.as_telemetry(), "params": run.params}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--steps", type=int, default=60, help="further optimizer steps of each setting (default 60)")
    parser.add_argument("--pretrain-steps", type=int, default=150, help="steps of the pretrained student (150: as "
                        "make demo-llm trains it)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per packed row")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--eval-rows", type=int, default=48, help="packed test rows evaluated")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    parser.add_argument("--measure-peak", choices=sorted(SETTINGS), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--student", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    corpus = WORK / "llm-corpus"
    if args.measure_peak:
        print("PEAK " + json.dumps(measure_peak(args.measure_peak, args.student, corpus, args)))
        return 0
    env = environment()
    print_environment(env)
    started = time.time()
    teacher = teacher_folder()
    write_corpus(corpus)
    common = dict(seq=args.seq, batch=args.batch, eval_rows=args.eval_rows, precision="no", budget=5.5)
    pretrained = WORK / "runs" / "llm-kd" / "student"
    if not (pretrained / "model.safetensors").is_file():
        print(f"Pretraining the student ({args.pretrain_steps} KD steps, as make demo-llm does)", flush=True)
        train("llm-kd", teacher, corpus, SimpleNamespace(steps=args.pretrain_steps, lr=5e-4, **common), distil=True,
              extra=("run.overwrite=true",))
    runs = {}
    for name, (distil, lr, extra) in SETTINGS.items():
        print(f"== {LABELS[name]} ({args.steps} steps, lr {lr:g})", flush=True)
        runs[name] = train(f"lora-bench-{name}", teacher, corpus, SimpleNamespace(steps=args.steps, lr=lr, **common),
                           distil=distil, extra=(*from_pretrained(pretrained), *extra, "run.overwrite=true"))
    summaries = {name: summarise(run) for name, run in runs.items()}
    scores = evaluate({"pretrained": pretrained, **{n: r / "student" for n, r in runs.items()}}, teacher, corpus,
                      SimpleNamespace(**common))
    peaks = {}
    for name in SETTINGS:
        result = subprocess.run([sys.executable, __file__, "--measure-peak", name, "--student", str(pretrained),
                                 "--seq", str(args.seq), "--batch", str(args.batch)], cwd=ROOT, capture_output=True,
                                text=True)
        line = [ln for ln in result.stdout.splitlines() if ln.startswith("PEAK ")]
        if result.returncode != 0 or not line:
            raise SystemExit(f"error: the memory measurement of {name} failed:\n{result.stderr[-3000:]}")
        peaks[name] = json.loads(line[0][5:])
    lines = ["| model | trainable parameters | test perplexity | top-1 agreement | train tokens/s "
             "| estimate (CPU, no CUDA context) | measured peak (profiler) |", "|---|---|---|---|---|---|---|"]
    lines.append(f"| teacher SmolLM2-135M-Instruct | - | {scores['pretrained']['teacher_perplexity']:.2f} | - | - | - "
                 "| - |")
    lines.append(f"| {LABELS['pretrained']} | - | {scores['pretrained']['perplexity']:.2f} | "
                 f"{100 * scores['pretrained']['agreement']:.1f}% | - | - | - |")
    for name in SETTINGS:
        s, p = summaries[name], peaks[name]
        trainable = p["params"].get("student_trainable") or p["params"]["student"]
        lines.append(f"| {LABELS[name]} | {trainable / 1e6:.2f}M of {p['params']['student'] / 1e6:.1f}M | "
                     f"{scores[name]['perplexity']:.2f} | {100 * scores[name]['agreement']:.1f}% | "
                     f"{s['tokens_per_s'] or 0:.0f} | {p['estimate_bytes'] / 1e9:.2f} GB | "
                     f"{p['peak_bytes'] / 1e9:.2f} GB |")
    lines.append(f"\n{args.steps} further steps x {args.batch} rows x {args.seq} tokens from the pretrained student; "
                 f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, {env['date']}; "
                 f"{time.time() - started:.0f} s in all; test: {scores['pretrained']['tokens']} tokens of modules "
                 "never trained on.")
    print("\n".join(lines))
    results = {"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "scores": scores,
               "runs": summaries, "peaks": peaks, "table": lines}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text("\n".join(lines) + "\n")
        save_results(results, args.out / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
