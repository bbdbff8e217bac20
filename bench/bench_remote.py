"""A remote teacher on a real LM: SmolLM2-135M served over the OpenAI-compatible API, scored by the kit.

    python bench/bench_remote.py                       # serves .bench/smollm2-135m with kd.teachers.remote.server
    python bench/bench_remote.py --url http://127.0.0.1:8001/v1 --model /path/served   # any server (vLLM)
    python bench/bench_remote.py --server-dtype bf16 --agreement-only   # what a bf16 server costs in agreement

Needs the converted teacher (`make demo-llm` writes .bench/smollm2-135m and .bench/llm-corpus). Measures,
in one run on this machine:
1. agreement of the server's top-k with the local teacher's (same weights, loaded here): top-1 ids,
   top-k id sets, largest log-probability difference, over rows of the validation corpus;
2. the client alone: requests/s and latency p50/p95 at the configured concurrency;
3. training through train_kd.py from a cold cache with prefetch on (4 batches ahead) and off:
   tokens/s and the time the loop waited for the teacher (the server shares this machine's cores);
4. generate mode (`--generate`), on /completions and /chat/completions: the rows the kit builds
   from the server's answers against the local teacher: answers equal to local greedy decoding,
   top-1 agreement and largest log-probability difference at every answer position.
Writes bench/remote/results.json; the figures go to bench/RESULTS.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / ".bench"

from kd.config import EndpointConfig  # noqa: E402
from kd.lm.losses import TopK  # noqa: E402
from kd.teachers.remote.client import EndpointClient  # noqa: E402
from kd.teachers.remote.protocol import TokenMap, completion_logprobs, score_request  # noqa: E402

from workloads import save_results  # noqa: E402


def start_server(folder: Path, port: int, dtype: str = "fp32") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "kd.teachers.remote.server", "--model", str(folder),
                             "--port", str(port), "--dtype", dtype], cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    sys.exit("error: the teacher server did not start within 300 s")


def rows(tokenizer, corpus: Path, n: int, seq: int) -> list[list[int]]:
    texts = [json.loads(line)["text"] for line in (corpus / "validation.jsonl").read_text().splitlines()]
    ids = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    return [ids[i * seq:(i + 1) * seq] for i in range(n)]


def agreement(client: EndpointClient, model_id: str, folder: Path, tokenizer, samples: list[list[int]], k: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = TokenMap(tokenizer, kind="ids")  # the requests ask for token ids (return_tokens_as_token_ids)
    top1 = overlap = positions = 0
    worst = 0.0
    for ids in samples:
        answer, _ = client.call(client.post("/completions", lambda kk: score_request(model_id, ids, k)))
        _, _, top = completion_logprobs(answer)
        r_ids, r_lps = tokens.top(top[1:len(ids)], k)
        with torch.no_grad():
            local = TopK.from_logits(model(torch.tensor([ids])).logits[0, :-1], k)
        for p in range(len(r_ids)):
            l_ids = local.indices[p].tolist()
            top1 += int(r_ids[p, 0]) == l_ids[0]
            overlap += len(set(r_ids[p].tolist()) & set(l_ids)) / k
            l_map = dict(zip(l_ids, local.logprobs[p].tolist()))
            worst = max([worst] + [abs(float(v) - l_map[int(i)]) for v, i in zip(r_lps[p], r_ids[p])
                                   if int(i) in l_map])
            positions += 1
    return {"positions": positions, "top1_agreement": top1 / positions, "topk_overlap": overlap / positions,
            "max_abs_logprob_diff": worst}


PROMPTS = ["What is a Python generator?", "Explain recursion in one sentence.", "Name three prime numbers.",
           "What does HTTP stand for?", "Give a synonym for 'quick'.", "Why is the sky blue?",
           "Write a haiku about autumn.", "What is the capital of France?"]


def generate_agreement(url: str, model_id: str, folder: Path, tokenizer, api: str, k: int, new_tokens: int) -> dict:
    """The kit's generate-mode batch (prompt + the server's answer, its top k per answer token)
    against the local teacher on the same rows."""
    import tempfile

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from kd.config import DataConfig, config_from_dict
    from kd.lm.data import LMCollator, prepare_prompt_splits
    from kd.teachers.remote.source import RemoteTeacher

    with tempfile.TemporaryDirectory() as cache:
        cfg = config_from_dict({
            "data": {"dataset": "json", "data_dir": "x", "modality": "causal_lm", "max_length": 256},
            "teacher": {"model": str(folder), "endpoint": {"url": url, "model": model_id, "top_k": k,
                                                           "mode": "generate", "api": api,
                                                           "max_new_tokens": new_tokens, "timeout_s": 600}},
            "student": {"type": "hf"}, "distillation": {"cache_dir": cache}})
        split = prepare_prompt_splits({"train": Dataset.from_dict({"prompt": PROMPTS})},
                                      DataConfig(dataset="json", modality="causal_lm", max_length=256), tokenizer,
                                      chat=api == "chat", budget=256 - new_tokens - 1)["train"]
        rows = [split[i] for i in range(len(split))]
        batch = LMCollator(tokenizer.pad_token_id)(rows)
        remote = RemoteTeacher(cfg, tokenizer, say=print)
        remote.connect({})  # the probe, and the answer cache opened
        try:
            started = time.perf_counter()
            got = next(iter(remote.prefetch([batch], iter([rows]))))
            elapsed = time.perf_counter() - started
        finally:
            remote.close()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids, mask, labels = got["inputs"]["input_ids"], got["inputs"]["attention_mask"], got["labels"]
    same_answer = 0
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for r, row in enumerate(rows):
            prompt = list(row["input_ids"])
            greedy = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
            seq = ids[r][mask[r].bool()].tolist()[len(prompt):]
            same_answer += greedy[:len(seq)] == seq
    top = got["soft_targets"]
    # Positions with a one-hot target (an end token appended by the kit) have no server distribution.
    learnt = (labels != -100) & (top.logprobs[..., 1] > -1e3)
    local_top1 = logp.argmax(-1)
    return {"api": api, "prompts": len(rows), "answer_tokens": int(learnt.sum()),
            "one_hot_end_positions": int(((labels != -100) & ~learnt).sum()),
            "answers_equal_local_greedy": same_answer / len(rows),
            "stopped": sum(int((labels[r] == tokenizer.eos_token_id).any()) for r in range(len(rows))),
            "top1_agreement": float((top.indices[..., 0] == local_top1)[learnt].float().mean()),
            "max_abs_logprob_diff": float((top.logprobs - logp.gather(-1, top.indices)).abs()[learnt].max()),
            "seconds": elapsed, "answer_tokens_per_s": int(learnt.sum()) / elapsed}


def client_speed(url: str, model_id: str, samples: list[list[int]], k: int, concurrency: int) -> dict:
    client = EndpointClient(EndpointConfig(url=url, model=model_id, top_k=k, min_top_k=min(10, k),
                                           concurrency=concurrency, timeout_s=300), None)
    try:
        started = time.perf_counter()
        futures = [client.submit(client.post("/completions", lambda kk, ids=ids: score_request(model_id, ids, k)))
                   for ids in samples]
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - started
        figures = client.snapshot()
    finally:
        client.close()
    return {"requests": len(samples), "requests_per_s": len(samples) / elapsed,
            "latency_p50_s": figures["latency_p50_s"], "latency_p95_s": figures["latency_p95_s"],
            "concurrency": concurrency}


def train(name: str, url: str, model_id: str, prefetch: int, args) -> dict:
    from kd.telemetry import read_events

    out, cache = WORK / "runs" / name, WORK / "remote-cache" / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)  # a cold cache: every answer comes from the server
    overrides = [f"run.name={name}", f"run.output_dir={out}", f"teacher.endpoint.url={url}",
                 f"teacher.endpoint.model={model_id}", f"teacher.endpoint.prefetch_batches={prefetch}",
                 f"distillation.cache_dir={cache}", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
                 "data.max_eval_samples=8", "data.test_split=null", f"data.max_length={args.seq}",
                 f"train.batch_size={args.batch}", "telemetry.log_every=5", "telemetry.warmup_steps=2"]
    config = ROOT / "configs" / "remote_teacher.yaml"
    subprocess.run([sys.executable, str(ROOT / "train_kd.py"), "--config", str(config), *overrides], check=True,
                   cwd=ROOT)
    steps = [e for e in read_events(out / "telemetry.jsonl") if e["type"] == "step"]
    timed = [e for e in steps if e.get("rate")]
    waited = sum(e["remote_teacher"]["wait_s"] for e in steps)
    step_time = sum(e["time"]["step_s"] * 5 for e in timed)  # log_every 5 steps per line
    return {"prefetch_batches": prefetch, "tokens_per_s": sum(e["rate"]["tokens_per_s"] for e in timed) / len(timed),
            "waited_s": waited, "requests": sum(e["remote_teacher"]["requests"] for e in steps),
            "wait_share": waited / step_time if step_time else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an external server's base URL (default: start kd.teachers.remote.server here)")
    parser.add_argument("--model", help="the external server's model id")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--rows", type=int, default=16, help="rows scored for agreement and speed")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20, help="training steps per prefetch setting")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="bench/remote")
    parser.add_argument("--generate", action="store_true", help="only the generate-mode check (both APIs)")
    parser.add_argument("--new-tokens", type=int, default=48, help="generate: answer length")
    parser.add_argument("--server-dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="the precision the kit's own server computes in (the local teacher stays fp32)")
    parser.add_argument("--agreement-only", action="store_true", help="measure agreement, not speed or training")
    parser.add_argument("--agreement-rows", type=int, default=4, help="rows scored for agreement")
    args = parser.parse_args()
    folder, corpus = WORK / "smollm2-135m", WORK / "llm-corpus"
    if not (folder / "model.safetensors").is_file() or not corpus.is_dir():
        sys.exit("error: run `make demo-llm` first (it writes .bench/smollm2-135m and .bench/llm-corpus)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    server = None
    url, model_id = args.url, args.model
    if url is None:
        server = start_server(folder, args.port, args.server_dtype)
        url, model_id = f"http://127.0.0.1:{args.port}/v1", folder.name
    if args.generate:
        try:
            result = {api: generate_agreement(url, model_id, folder, tokenizer, api, args.k, args.new_tokens)
                      for api in ("completions", "chat")}
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
        result.update(server="kd.teachers.remote.server" if args.url is None else args.url, model=model_id, k=args.k,
                      torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
        out = ROOT / args.out
        out.mkdir(parents=True, exist_ok=True)
        save_results(result, out / "generate.json")
        print(json.dumps(result, indent=2))
        return 0
    try:
        samples = rows(tokenizer, corpus, args.rows, args.seq)
        client = EndpointClient(EndpointConfig(url=url, model=model_id, top_k=args.k, min_top_k=min(10, args.k),
                                               timeout_s=300), None)
        try:
            agree = agreement(client, model_id, folder, tokenizer, samples[:args.agreement_rows], args.k)
        finally:
            client.close()
        if not args.agreement_only:
            speed = {c: client_speed(url, model_id, samples, args.k, c) for c in (1, 8)}
            runs = {p: train(f"remote-prefetch-{p}", url, model_id, p, args) for p in (4, 0)}
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    result = {"server": "kd.teachers.remote.server" if args.url is None else args.url, "model": model_id, "k": args.k,
              "seq": args.seq, "server_dtype": args.server_dtype if args.url is None else None, "agreement": agree,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d")}
    if not args.agreement_only:
        result.update(client=speed, training=runs, prefetch_speedup=runs[4]["tokens_per_s"] / runs[0]["tokens_per_s"])
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    save_results(result, out / ("agreement.json" if args.agreement_only else "results.json"))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
