"""The demo student as it ships: file sizes, latency per one-second clip, accuracy fp32 vs int8, and
the streaming detector on a recording made of unseen test clips.

    make demo                                  # trains runs/demo-kd with export.onnx and export.int8
    python bench/bench_onnx.py                 # or: --run runs/other-run

Latency: batch 1, one CPU thread, one clip of the model's window; median of --repeats calls after
warm-up, onnxruntime (fp32, int8) against PyTorch eager, all measured in this one run. Accuracy: the
run's test split (voices never heard in training). Detector: --clips test clips placed in one
recording with silence between them; a hit is a detection with the right word inside its clip.
Results go to bench/onnx/results.json with the machine and versions; copy the table to RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.config import load_config  # noqa: E402
from kd.data import prepare_data  # noqa: E402
from kd.export.detect import KeywordModel, detect, ort_session  # noqa: E402
from kd.export.onnx import INT8_NAME, ONNX_NAME, Graph, onnx_predictions, split_batches  # noqa: E402
from kd.export.student import load_student  # noqa: E402

from workloads import save_results  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo-kd", help="a finished run with student/model.onnx")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--clips", type=int, default=40, help="test clips in the detector's recording")
    parser.add_argument("--out", default="bench/onnx")
    args = parser.parse_args()
    run = ROOT / args.run
    folder = run / "student"
    for name in (ONNX_NAME, INT8_NAME):
        if not (folder / name).is_file():
            print(f"error: {folder / name} not found; run `make demo` first (configs/demo.yaml exports both)",
                  file=sys.stderr)
            return 2
    cfg = load_config(run / "config.yaml")
    model, labels = load_student(folder)
    data = prepare_data(cfg.data, None, model.sample_rate)
    test = data.splits["test"]
    window = int(round(cfg.data.max_seconds * model.sample_rate))

    # Sizes
    sizes = {"safetensors": (folder / "model.safetensors").stat().st_size,
             "onnx_fp32": (folder / ONNX_NAME).stat().st_size, "onnx_int8": (folder / INT8_NAME).stat().st_size}

    # Latency: batch 1, one thread
    torch.set_num_threads(1)
    clip = np.asarray(data.collate([test[0]])["waveform"][:, :window], dtype=np.float32)
    fp32, int8 = ort_session(folder / ONNX_NAME, threads=1), ort_session(folder / INT8_NAME, threads=1)
    eager = model.eval()
    tensor = torch.from_numpy(clip)

    def torch_call():
        with torch.inference_mode():
            eager(tensor)

    latency = {"pytorch_eager": median_ms(torch_call, args.repeats),
               "onnxruntime_fp32": median_ms(lambda: fp32.run(["logits"], {"waveform": clip}), args.repeats),
               "onnxruntime_int8": median_ms(lambda: int8.run(["logits"], {"waveform": clip}), args.repeats)}

    # Accuracy on the test split
    graph = Graph(model, ["waveform"])
    p32, truth = onnx_predictions(ort_session(folder / ONNX_NAME), graph, split_batches(data, "test"))
    p8, _ = onnx_predictions(ort_session(folder / INT8_NAME), graph, split_batches(data, "test"))
    with torch.inference_mode():
        pt = np.concatenate([eager(b["waveform"]).argmax(-1).numpy() for b in split_batches(data, "test")])
    accuracy = {"pytorch": float((pt == truth).mean()), "onnx_fp32": float((p32 == truth).mean()),
                "onnx_int8": float((p8 == truth).mean()), "int8_same_label_as_fp32": float((p8 == p32).mean()),
                "test_clips": int(len(truth))}

    # The detector on a recording of test clips with 1 s of silence between them
    rng = np.random.default_rng(0)
    picks = rng.choice(len(test), size=min(args.clips, len(test)), replace=False)
    gap = model.sample_rate
    audio, spans = [np.zeros(gap, np.float32)], []
    position = gap
    for i in picks:
        row = data.collate([test[int(i)]])
        wave = row["waveform"][0, :window].numpy()
        spans.append((position / model.sample_rate, (position + wave.size) / model.sample_rate,
                      labels[int(row["labels"][0])]))
        audio += [wave, np.zeros(gap, np.float32)]
        position += wave.size + gap
    stream = np.concatenate(audio)
    keyword_model = KeywordModel.load(folder / ONNX_NAME)
    started = time.perf_counter()
    found = detect(keyword_model, stream, keyword_model.hop)
    detect_s = time.perf_counter() - started
    hits = sum(any(a <= d.time_s <= b and d.label == word for d in found) for a, b, word in spans)
    wrong = sum(not any(a <= d.time_s <= b and d.label == word for a, b, word in spans) for d in found)
    detector = {"clips": len(spans), "hits": hits, "missed": len(spans) - hits, "false_or_wrong": wrong,
                "audio_s": stream.size / model.sample_rate, "seconds": detect_s}

    env = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
           "python": platform.python_version(), "torch": torch.__version__,
           "onnxruntime": __import__("onnxruntime").__version__, "onnx": __import__("onnx").__version__}
    results = {"env": env, "run": str(args.run), "sizes_bytes": sizes, "latency_ms": latency,
               "accuracy": accuracy, "detector": detector}
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    save_results(results, out / "results.json")

    print(f"{args.run}/student, {env['date']}, torch {env['torch']}, onnxruntime {env['onnxruntime']}")
    print(f"size: safetensors {sizes['safetensors'] / 1e3:.1f} kB, ONNX fp32 {sizes['onnx_fp32'] / 1e3:.1f} kB, "
          f"int8 {sizes['onnx_int8'] / 1e3:.1f} kB ({sizes['onnx_int8'] / sizes['onnx_fp32']:.2f}x)")
    print(f"latency per {cfg.data.max_seconds:g} s clip (batch 1, 1 thread, median): PyTorch eager "
          f"{latency['pytorch_eager']:.2f} ms, onnxruntime fp32 {latency['onnxruntime_fp32']:.2f} ms "
          f"({latency['pytorch_eager'] / latency['onnxruntime_fp32']:.1f}x faster), int8 "
          f"{latency['onnxruntime_int8']:.2f} ms")
    print(f"test accuracy ({accuracy['test_clips']} clips): PyTorch {100 * accuracy['pytorch']:.2f}%, ONNX fp32 "
          f"{100 * accuracy['onnx_fp32']:.2f}%, int8 {100 * accuracy['onnx_int8']:.2f}% (same label as fp32 on "
          f"{100 * accuracy['int8_same_label_as_fp32']:.1f}%)")
    print(f"detector: {hits}/{len(spans)} words found, {wrong} false or wrong detections, "
          f"{detector['audio_s']:.0f} s of audio in {detect_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
