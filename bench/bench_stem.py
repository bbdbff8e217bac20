"""The log-mel CNN's stem: `student.stem_stride` 1 against 2, measured in one run.

    python bench/bench_stem.py                    # the demo student ([32, 64, 64, 128], 8 kHz, 1 s clips)
    python bench/bench_stem.py --channels 64 128 128 256 --rate 16000   # the flagship student of 5gb.yaml

For each stride: parameters; one training step (forward, backward and AdamW on a batch of random
one-second waveforms, on the GPU when there is one, else every CPU core), median of --repeats after
warm-up; and the shipped model's latency on one clip (batch 1, one CPU thread, PyTorch eager and
ONNX Runtime), as bench/bench_onnx.py measures it. Stride 2 halves both axes of the first feature
map; the parameters stay the same, so the step ratio is what the strided stem buys. Accuracy is not
measured here: it depends on data and schedule (bench/RESULTS.md, bench/bench_fsdd.py). Results go
to --out/results.json with the machine and versions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_onnx import median_ms  # noqa: E402

from kd.audio.logmel_cnn import STEM_STRIDES, LogMelCNN  # noqa: E402
from kd.export.detect import ort_session  # noqa: E402
from kd.export.onnx import export_onnx, run_onnx  # noqa: E402

from workloads import environment, print_environment, save_results  # puts the repository root on sys.path


def train_step_ms(model: LogMelCNN, batch: int, rate: int, device: torch.device, repeats: int) -> float:
    model.train().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    waves = torch.randn(batch, rate, generator=generator).to(device)
    labels = torch.randint(0, model.config["num_labels"], (batch,), generator=generator).to(device)

    def step():
        loss = F.cross_entropy(model(waves), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return median_ms(step, repeats)


def latency_ms(model: LogMelCNN, rate: int, repeats: int) -> dict[str, float]:
    """Batch 1, one thread: PyTorch eager and the exported ONNX model (checked against eager on export)."""
    model.eval().cpu()
    clip = torch.randn(1, rate, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as folder:
            _, report = export_onnx(model, None, {"waveform": clip}, folder, metadata={})
            session = ort_session(report.path, threads=1)
            inputs = {"waveform": clip.numpy().astype(np.float32)}
            onnx_ms = median_ms(lambda: run_onnx(session, inputs), repeats)

        def eager():
            with torch.inference_mode():
                model(clip)

        return {"eager_ms": median_ms(eager, repeats), "onnx_ms": onnx_ms}
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64, 128])
    parser.add_argument("--rate", type=int, default=8000, help="sample rate; clips are one second")
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20, help="timed training steps per stride")
    parser.add_argument("--latency-repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/stem"))
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.latency_repeats < 1 or min(args.channels) < 1:
        print("error: --batch, --repeats, --latency-repeats and --channels must be >= 1", file=sys.stderr)
        return 2
    env = environment()
    print_environment(env)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = {}
    for stride in STEM_STRIDES:
        torch.manual_seed(0)
        model = LogMelCNN(args.labels, args.rate, channels=args.channels, stem_stride=stride)
        rows[stride] = {"parameters": sum(p.numel() for p in model.parameters()),
                        "train_step_ms": train_step_ms(model, args.batch, args.rate, device, args.repeats),
                        **latency_ms(model, args.rate, args.latency_repeats)}
    print(f"\nchannels {args.channels}, {args.rate} Hz, training batch {args.batch} on {device.type}; "
          "latency: batch 1, one CPU thread")
    print(f"{'stem_stride':<12}{'parameters':>12}{'train step':>14}{'eager clip':>13}{'ONNX clip':>12}")
    for stride, row in rows.items():
        print(f"{stride:<12}{row['parameters']:>12,}{row['train_step_ms']:>11.1f} ms{row['eager_ms']:>10.2f} ms"
              f"{row['onnx_ms']:>9.2f} ms")
    full, strided = rows[1], rows[2]
    ratios = {key: full[key] / strided[key] for key in ("train_step_ms", "eager_ms", "onnx_ms")}
    shown = ", ".join(f"{key.removesuffix('_ms')} {value:.2f}x" for key, value in ratios.items())
    print(f"stride 1 / stride 2: {shown}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"env": env, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "device": device.type, "strides": rows, "ratios": ratios}
    save_results(results, args.out / "results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
