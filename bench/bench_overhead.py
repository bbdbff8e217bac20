"""The kit's overhead: its training loop against a plain hand-written PyTorch KD loop.

Both run in this one process, on the same tiny teacher (wav2vec2, random weights), the same log-mel
CNN student architecture and the same batches (the same prepared dataset and collate function), for
the same number of optimizer steps. Rounds alternate kit / plain so drift in machine speed hits
both; the reported ratio is the median of the per-round ratios (kit time / plain time; 1.00 means
no overhead). What the kit adds per step: Accelerate's accumulate/autocast/backward wrappers and
prepared DataLoader, on-device loss accumulation, telemetry lines, the progress bar.

    python bench/bench_overhead.py            # or: make bench
    python bench/bench_overhead.py --steps 80 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accelerate  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from kd.build import build_run  # noqa: E402
from kd.config import config_from_dict  # noqa: E402
from kd.data import make_loader  # noqa: E402
from kd.students import LogMelCNN  # noqa: E402
from kd.synthetic import save_tiny_wav2vec2, write_tone_dataset  # noqa: E402
from kd.trainer import Trainer  # noqa: E402


def plain_loop(run, steps: int, cfg) -> float:
    """Textbook KD: teacher under no_grad, (1-a)*CE + a*T^2*KL, backward, clip, AdamW, schedule."""
    data, teacher = run.data, run.teacher
    torch.manual_seed(0)
    student = LogMelCNN(len(data.label_names), data.sampling_rate, cfg.student.n_mels, cfg.student.channels)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = transformers.get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=steps)
    loader = make_loader(data.splits["train"], cfg.data, cfg.train.batch_size, collate=data.collate, shuffle=True,
                         pin_memory=False)
    alpha, temperature = cfg.distillation.alpha, cfg.distillation.temperature
    done = 0
    started = time.perf_counter()
    while done < steps:
        for batch in loader:
            with torch.no_grad():
                t_logits = teacher(**batch["inputs"]).logits
            s_logits = student(batch["waveform"])
            ce = F.cross_entropy(s_logits, batch["labels"])
            kd = F.kl_div(F.log_softmax(s_logits / temperature, -1), F.log_softmax(t_logits / temperature, -1),
                          reduction="batchmean", log_target=True) * temperature**2
            loss = (1 - alpha) * ce + alpha * kd
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            done += 1
            if done % cfg.telemetry.log_every == 0:
                loss.item()  # a loop that logs reads its loss back too
            if done == steps:
                break
    return time.perf_counter() - started


def kit_loop(run, steps: int) -> float:
    trainer = Trainer(run)
    started = time.perf_counter()
    trainer._train()  # the loop alone: start-up (run_start) and the final export are not per-step costs
    elapsed = time.perf_counter() - started
    trainer.telemetry.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (kit and plain in each)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("HF_HOME", str(tmp / "hf"))
        data_dir = write_tone_dataset(tmp / "tones", {"train": 64}, rate=16000)
        teacher = save_tiny_wav2vec2(tmp / "teacher", ["high", "low", "mid"])
        cfg = config_from_dict({
            "run": {"name": "bench", "output_dir": str(tmp / "run"), "seed": 0},
            # Teacher features from the collate function for both loops: the plain loop reads batch["inputs"].
            "data": {"dataset": "audiofolder", "data_dir": str(data_dir), "eval_split": None, "num_workers": 0,
                     "features_on_device": False},
            "teacher": {"model": str(teacher)},
            "student": {"type": "logmel_cnn"},
            "train": {"batch_size": args.batch_size, "epochs": None, "max_steps": args.steps, "lr": 0.003,
                      "warmup_ratio": 0.0, "eval_every": 10**9},
            "telemetry": {"log_every": 10},
        })
        run = build_run(cfg)
        rows = []
        for i in range(args.rounds + 1):  # round 0 warms up allocators and caches; it is dropped
            kit_run = build_run(cfg)
            # Alternate which loop goes first, so a slow-down that follows one of them hits both.
            if i % 2 == 0:
                kit, plain = kit_loop(kit_run, args.steps), plain_loop(run, args.steps, cfg)
            else:
                plain, kit = plain_loop(run, args.steps, cfg), kit_loop(kit_run, args.steps)
            rows.append((kit, plain))
        rows = rows[1:]
    print()
    print(f"device: {run.accelerator.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads); python {platform.python_version()}, torch {torch.__version__}, "
          f"accelerate {accelerate.__version__}, transformers {transformers.__version__}")
    print(f"workload: tiny wav2vec2 teacher -> log-mel CNN student, batch {args.batch_size}, {args.steps} steps/round")
    print(f"{'round':>5} {'kit s':>8} {'plain s':>8} {'kit ms/step':>12} {'plain ms/step':>14} {'ratio':>6}")
    for i, (kit, plain) in enumerate(rows, 1):
        print(f"{i:>5} {kit:8.2f} {plain:8.2f} {1000 * kit / args.steps:12.1f} {1000 * plain / args.steps:14.1f} "
              f"{kit / plain:6.3f}")
    ratios = sorted(k / p for k, p in rows)
    total = sum(k for k, _ in rows) / sum(p for _, p in rows)
    print(f"kit overhead ratio: median of rounds {statistics.median(ratios):.3f} (range {ratios[0]:.3f}-"
          f"{ratios[-1]:.3f}), total time {total:.3f}  (target <= 1.10 on CPU)")


if __name__ == "__main__":
    main()
