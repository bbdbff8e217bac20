"""Which settings fit a 5.5 GB card for the usual language-model pairs, planned from configs alone.

    python bench/plan_llm_pairs.py                 # the Markdown table in README.md / docs/language-models.md
    python bench/plan_llm_pairs.py --budget 8      # another card

Qwen2.5-7B-Instruct -> Qwen2.5-0.5B-Instruct and 1.5B -> 0.5B (their published config.json files,
tests/fixtures/qwen2.5), batch 1, bf16 autocast: each combination of the student's training (every
weight, or LoRA rank 16 with gradient checkpointing), where the teacher is (online on the GPU in
bf16, online on the CPU, a teacher cache of the top 64 logits, a remote server) and max_length goes
through `kd.lm.planner.plan_from_configs`, what `train_kd.py --preflight` prints for such a config.
Nothing is downloaded or loaded; the figures are estimates (see the planner's docstring).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.config import config_from_dict  # noqa: E402
from kd.lm.planner import plan_from_configs  # noqa: E402

QWEN = ROOT / "tests" / "fixtures" / "qwen2.5"
PAIRS = (("7B", "0.5B"), ("1.5B", "0.5B"))
STUDENTS = {"every weight": {}, "LoRA r16 + checkpointing": {"lora": {"rank": 16}, "gradient_checkpointing": True}}
TEACHERS = {
    "online, GPU (bf16)": ({"device": "cuda"}, {}),
    "online, CPU": ({"device": "cpu"}, {}),
    "cache (top 64)": ({}, {"teacher_cache": "require", "cache_top_k": 64}),
    "remote server": ({"endpoint": {"url": "http://127.0.0.1:8000/v1", "model": "teacher"}}, {}),
}
LENGTHS = (512, 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=5.5, help="memory.vram_budget_gb (default 5.5)")
    args = parser.parse_args(argv)
    data = Path(tempfile.mkdtemp(prefix="kd-plan-"))  # the planner reads no data; the config names a folder
    print(f"| pair | student trains | teacher | {' | '.join(f'max_length {n}' for n in LENGTHS)} |")
    print("|---|---|---|" + "---|" * len(LENGTHS))
    for big, small in PAIRS:
        for student_name, student in STUDENTS.items():
            for teacher_name, (teacher, distillation) in TEACHERS.items():
                cells = []
                for length in LENGTHS:
                    cfg = config_from_dict({
                        "data": {"dataset": "json", "data_dir": str(data), "modality": "causal_lm",
                                 "input_column": "text", "max_length": length},
                        "teacher": {"model": str(QWEN / f"Qwen2.5-{big}-Instruct"), "dtype": "bf16", **teacher},
                        "student": {"type": "hf", "model": str(QWEN / f"Qwen2.5-{small}-Instruct"), **student},
                        "distillation": distillation,
                        "train": {"batch_size": 1, "mixed_precision": "bf16", "epochs": 1},
                        "memory": {"vram_budget_gb": args.budget}})
                    total = plan_from_configs(cfg).estimate.total / 1e9
                    cells.append(f"{total:.1f} GB {'fits' if total <= args.budget else 'no'}")
                print(f"| {big} -> {small} | {student_name} | {teacher_name} | {' | '.join(cells)} |")
    print(f"\n(estimates from the published config.json files, batch 1, bf16 autocast, budget {args.budget:g} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
