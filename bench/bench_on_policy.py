"""On-policy distillation against off-policy KD and CE only, on what on-policy is for: the student's own text.

    python bench/bench_on_policy.py                       # about 30 min on 2 CPU cores
    python bench/bench_on_policy.py --steps 40 --out bench/on_policy

1. The pretrained student: the 4-layer SmolLM2 student that `make demo-llm` trains (teacher blocks
   0, 10, 20, 29, 150 steps of KD; reused from .bench/runs/llm-kd when it is there).
2. From it (`student.model`), the same number of further steps on the same rows (docstrings, one
   per row, cut to --seq tokens), each way:
   `ce` (CE only), `off_policy` (KD on the corpus text: 0.5 CE + 0.5 forward KL),
   `on_policy_0.5` and `on_policy_1.0` (distillation.on_policy.share: that share of micro-batches is
   the student's own continuation of the row's first --prompt tokens, --new tokens at T = 1, scored
   by the teacher, reverse KL on the sampled tokens), and `on_policy_1.0_remote` (the same, with the
   teacher behind kd.teachers.remote.server on 127.0.0.1 in score mode: its top 20 per token).
3. Held out (modules never trained on): (a) test perplexity (the run's own test evaluation, the same
   rows for every model); (b) the teacher's mean per-token negative log-likelihood of each student's
   greedy continuation (--new tokens) of the first --prompt tokens of each test row: lower means
   text the teacher finds likelier, which is what on-policy distillation optimises. The teacher's
   own greedy continuations give the floor; distinct-2 (the share of each continuation's token pairs
   that are new in it) shows whether a low NLL is bought with repetition. A few continuations are
   printed side by side.
4. Wall-clock of each run, train tokens/s, and on-policy figures (sampled tokens/s, mean sample length).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_llm import WORK, summarise, teacher_folder, write_corpus
from bench_remote import start_server

from workloads import ROOT, environment, print_environment, save_results

SETTINGS = {  # name: (distillation on, on-policy share, remote teacher)
    "ce": (False, 0.0, False),
    "off_policy": (True, 0.0, False),
    "on_policy_0.5": (True, 0.5, False),
    "on_policy_1.0": (True, 1.0, False),
    "on_policy_1.0_remote": (True, 1.0, True),
}
LABELS = {"pretrained": "pretrained student (start)", "ce": "CE only", "off_policy": "off-policy KD (forward KL)",
          "on_policy_0.5": "on-policy 0.5 (reverse KL)", "on_policy_1.0": "on-policy 1.0 (reverse KL)",
          "on_policy_1.0_remote": "on-policy 1.0, remote teacher (top 20)", "teacher": "teacher (its own greedy)"}
PORT = 8131


def train(name: str, teacher: Path, student: Path, corpus: Path, args, setting: tuple, url: str | None) -> Path:
    distil, share, remote = setting
    out = WORK / "runs" / f"on-policy-{name}"
    overrides = [
        f"run.name=on-policy-{name}", f"run.output_dir={out}", "run.seed=0", "run.overwrite=true",
        "data.dataset=json", f"data.data_dir={corpus}", "data.modality=causal_lm", "data.input_column=text",
        "data.eval_split=null", "data.test_split=test", f"data.max_length={args.seq}", "data.packing=false",
        f"data.max_eval_samples={args.eval_rows}", "data.num_workers=0",
        f"teacher.model={teacher}", "student.type=hf", f"student.model={student}", "student.init_from_teacher=false",
        "student.teacher_layers=null", f"distillation.enabled={str(distil).lower()}", "distillation.alpha=0.5",
        "distillation.temperature=1.0", f"distillation.on_policy.share={share}",
        f"distillation.on_policy.max_new_tokens={args.new}", f"distillation.on_policy.prompt_tokens={args.prompt}",
        f"train.batch_size={args.batch}", "train.epochs=null", f"train.max_steps={args.steps}", f"train.lr={args.lr}",
        "train.warmup_ratio=0.05", f"train.eval_every={args.steps}", "telemetry.log_every=5", "export.onnx=false",
    ]
    if remote:
        overrides += [f"teacher.endpoint.url={url}", f"teacher.endpoint.model={teacher.name}",
                      "teacher.endpoint.mode=score", "teacher.endpoint.top_k=20", "teacher.endpoint.precision=fp32",
                      f"distillation.cache_dir={out / 'answers'}"]
    if args.reuse and (out / "wall_s").is_file() and (out / "student" / "model.safetensors").is_file():
        print(f"   reusing {out} (--reuse)", flush=True)
        return out
    started = time.time()
    subprocess.run([sys.executable, str(ROOT / "train_kd.py"), "--config", str(ROOT / "configs" / "smollm2_kd.yaml"),
                    *overrides], check=True, cwd=ROOT)
    (out / "wall_s").write_text(f"{time.time() - started:.1f}")
    return out


def continuations(models: dict[str, Path], teacher: Path, corpus: Path, args) -> tuple[dict, dict]:
    """Per model: the teacher's mean NLL per token of the model's greedy continuation of each held-out
    prompt, and the continuations' text."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    texts = load_dataset("json", data_files={"test": str(corpus / "test.jsonl")})["test"]["text"]
    prompts = [ids[:args.prompt] for ids in (tokenizer(t)["input_ids"] for t in texts) if len(ids) > args.prompt]
    prompts = prompts[:args.prompts]
    judge = AutoModelForCausalLM.from_pretrained(teacher, use_safetensors=True).eval()
    nll, text = {}, {}
    with torch.no_grad():
        for name, folder in models.items():
            model = judge if name == "teacher" else AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
            model.eval()
            total, count, written, bigrams, distinct = 0.0, 0, [], 0, 0
            for prompt in prompts:
                ids = torch.tensor([prompt])
                out = model.generate(ids, max_new_tokens=args.new, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                                     eos_token_id=tokenizer.eos_token_id)[0]
                new = out[len(prompt):].tolist()
                if tokenizer.eos_token_id in new:
                    new = new[:new.index(tokenizer.eos_token_id) + 1]
                written.append(tokenizer.decode(new, skip_special_tokens=True))
                pairs = list(zip(new, new[1:]))
                bigrams, distinct = bigrams + len(pairs), distinct + len(set(pairs))
                if not new:
                    continue
                seq = torch.tensor([prompt + new])
                logp = torch.log_softmax(judge(input_ids=seq).logits[0, :-1].float(), -1)
                targets = seq[0, 1:]
                token_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[len(prompt) - 1:]
                total -= float(token_lp.sum())
                count += len(new)
            # distinct-2: the share of a continuation's token pairs that are new in it (1: no repetition)
            nll[name] = {"teacher_nll": total / max(1, count), "tokens": count,
                         "distinct_2": distinct / bigrams if bigrams else None}
            text[name] = written
    return nll, {"prompts": [tokenizer.decode(p) for p in prompts], "text": text}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--steps", type=int, default=40, help="further optimizer steps of each setting (default 40)")
    parser.add_argument("--seq", type=int, default=96, help="tokens per row (a sampled row: prompt + sample)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens of a text row (training and test)")
    parser.add_argument("--new", type=int, default=32, help="sampled tokens per prompt (training and test)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-rows", type=int, default=48, help="test rows for perplexity")
    parser.add_argument("--prompts", type=int, default=40, help="held-out prompts continued greedily")
    parser.add_argument("--only", nargs="*", choices=sorted(SETTINGS), help="run these settings only")
    parser.add_argument("--reuse", action="store_true", help="keep the runs an earlier call finished (evaluate again)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    env = environment()
    print_environment(env)
    started = time.time()
    teacher, corpus = teacher_folder(), WORK / "llm-corpus"
    write_corpus(corpus)
    pretrained = WORK / "runs" / "llm-kd" / "student"
    if not (pretrained / "model.safetensors").is_file():
        raise SystemExit("error: no pretrained student at .bench/runs/llm-kd/student: run `make demo-llm` (or "
                         "bench/bench_lora.py, which trains it) first")
    settings = {n: s for n, s in SETTINGS.items() if not args.only or n in args.only}
    runs, server = {}, None
    try:
        for name, setting in settings.items():
            url = None
            if setting[2]:
                server = server or start_server(teacher, PORT)
                url = f"http://127.0.0.1:{PORT}/v1"
            print(f"== {LABELS[name]} ({args.steps} steps)", flush=True)
            runs[name] = train(name, teacher, pretrained, corpus, args, setting, url)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    summaries = {name: summarise(run) for name, run in runs.items()}
    for name, run in runs.items():
        summaries[name]["wall_s"] = float((run / "wall_s").read_text())
        from kd.telemetry import read_events

        ops = [e["on_policy"] for e in read_events(run / "telemetry.jsonl") if e["type"] == "step" and "on_policy" in e]
        generated, seconds = sum(o["generated_tokens"] for o in ops), sum(o["generate_s"] for o in ops)
        rows = sum(o["batches"] for o in ops) * args.batch
        summaries[name]["on_policy"] = {"sampled_tokens_per_s": generated / seconds if seconds else None,
                                        "mean_sample_tokens": generated / rows if rows else None,
                                        "score_s": sum(o["score_s"] for o in ops), "generate_s": seconds}
    nll, samples = continuations({"teacher": teacher, "pretrained": pretrained,
                                  **{n: r / "student" for n, r in runs.items()}}, teacher, corpus, args)
    lines = ["| model | test perplexity | teacher NLL of its greedy continuations (nats/token) | distinct-2 | "
             "wall-clock | train tokens/s | sampled tokens/s |", "|---|---|---|---|---|---|---|"]
    for name in ("teacher", "pretrained"):
        lines.append(f"| {LABELS[name]} | - | {nll[name]['teacher_nll']:.3f} | {nll[name]['distinct_2']:.2f} | - | - "
                     "| - |")
    for name in runs:
        s = summaries[name]
        op = s["on_policy"]["sampled_tokens_per_s"]
        lines.append(f"| {LABELS[name]} | {s['test']['perplexity']:.2f} | {nll[name]['teacher_nll']:.3f} | "
                     f"{nll[name]['distinct_2']:.2f} | {s['wall_s']:.0f} s | {s['tokens_per_s'] or 0:.0f} | "
                     f"{'-' if op is None else f'{op:.0f}'} |")
    lines.append(f"\n{args.steps} steps x {args.batch} rows from the pretrained student, rows of at most {args.seq} "
                 f"tokens (sampled rows: {args.prompt}-token prompt + up to {args.new} sampled); continuations: "
                 f"{len(samples['prompts'])} held-out prompts, {args.new} greedy tokens; {env['device']}, torch "
                 f"{env['torch']}, transformers {env['transformers']}, {env['date']}; {time.time() - started:.0f} s "
                 "in all.")
    shown = ["", "Continuations of held-out prompts (greedy):"]
    for i in range(min(3, len(samples["prompts"]))):
        shown.append(f"\nprompt: {samples['prompts'][i]!r}")
        for name, texts in samples["text"].items():
            shown.append(f"  {LABELS.get(name, name):<42} {texts[i]!r}")
    print("\n".join(lines + shown))
    results = {"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "runs": summaries, "nll": nll,
               "samples": samples, "table": lines}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text("\n".join(lines + shown) + "\n")
        save_results(results, args.out / "results.json")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
