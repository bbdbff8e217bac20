"""Run an exported keyword model over a long recording and print each detection with its time.

    python -m kd.export.detect runs/demo-kd/student/model.onnx recording.wav
    python -m kd.export.detect runs/demo-kd/student/model.int8.onnx - < recording.flac      # from stdin
    python -m kd.export.detect model.onnx long.wav --threshold 0.9 --hop-s 0.05 --refractory-s 1.5

A window as long as the model's training clips (kd.window_samples in the model's metadata) slides
over the audio by a hop (kd.hop_samples, or --hop-s); every window is classified, and its
probabilities averaged with its neighbours' over --smooth-s (a window holding only the edge of a word
can be confidently wrong). Windows whose top label reaches --threshold, and whose level reaches
--min-dbfs, are candidates; a run of consecutive candidates with the same label is one detection,
reported at the centre of the windows that fired (the word's middle, wherever it sits in them) with
their highest probability. After a detection,
others within --refractory-s are dropped. A model trained without a silence/background class
predicts some keyword for every window, so silence is left out by level (--min-dbfs); a model with
such a class can name it in --ignore.

Needs onnxruntime, numpy and soundfile only (no torch): it runs where the model ships.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BATCH = 64  # windows per onnxruntime call


@dataclass
class Detection:
    time_s: float
    label: str
    probability: float

    def line(self) -> str:
        return f"{self.time_s:9.2f} s  {self.label:<12} {self.probability:.3f}"


@dataclass
class KeywordModel:
    session: object
    labels: list[str]
    sample_rate: int
    window: int  # samples
    hop: int  # samples

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> "KeywordModel":
        try:
            sess = ort_session(path, threads)
        except Exception as exc:  # onnxruntime raises its own exception types for missing or bad files
            raise DetectError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        meta = sess.get_modelmeta().custom_metadata_map
        missing = [k for k in ("kd.labels", "kd.sample_rate", "kd.window_samples") if k not in meta]
        if missing or [i.name for i in sess.get_inputs()] != ["waveform"]:
            raise DetectError(f"{path}: not a waveform keyword model exported by this kit (missing "
                              f"{', '.join(missing) or 'the waveform input'}); export it with python -m kd.export.onnx")
        window = int(meta["kd.window_samples"])
        return cls(sess, json.loads(meta["kd.labels"]), int(meta["kd.sample_rate"]), window,
                   int(meta.get("kd.hop_samples", max(1, window // 10))))

    def classify(self, audio: np.ndarray, hop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per window over `audio` (zero-padded at the end): start sample, softmax probabilities, level in dBFS."""
        count = max(1, int(np.ceil(max(0, audio.size - self.window) / hop)) + 1)
        padded = np.zeros((count - 1) * hop + self.window, np.float32)
        padded[: audio.size] = audio
        starts = np.arange(count) * hop
        probs, levels = [], []
        for first in range(0, count, BATCH):
            windows = padded[starts[first: first + BATCH, None] + np.arange(self.window)]
            logits = self.session.run(["logits"], {"waveform": windows})[0].astype(np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            probs.append(p / p.sum(axis=1, keepdims=True))
            levels.append(10 * np.log10(np.mean(np.square(windows, dtype=np.float64), axis=1) + 1e-20))
        return starts, np.concatenate(probs), np.concatenate(levels)


def ort_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session (`threads`: intra-op threads, one inter-op; None: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class DetectError(Exception):
    """Bad input to the detector: said in one line, exit code 2."""


def detect(model: KeywordModel, audio: np.ndarray, hop: int, *, threshold: float = 0.8, refractory_s: float = 1.0,
           min_dbfs: float = -50.0, ignore: tuple[str, ...] = (), smooth_s: float = 0.3) -> list[Detection]:
    starts, probs, level = model.classify(audio, hop)
    probs = smooth(probs, max(1, int(round(smooth_s * model.sample_rate / hop))))
    top, best = probs.argmax(axis=1), probs.max(axis=1)
    ignored = {i for i, name in enumerate(model.labels) if name in ignore}
    fired = (best >= threshold) & (level >= min_dbfs) & ~np.isin(top, list(ignored))
    found: list[Detection] = []
    i = 0
    while i < len(starts):
        if not fired[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(starts) and fired[j + 1] and top[j + 1] == top[i]:
            j += 1
        centre = (starts[i: j + 1].mean() + model.window / 2) / model.sample_rate
        found.append(Detection(float(centre), model.labels[top[i]], float(best[i: j + 1].max())))
        i = j + 1
    kept: list[Detection] = []
    for d in found:
        if not kept or d.time_s >= kept[-1].time_s + refractory_s:
            kept.append(d)
    return kept


def smooth(probs: np.ndarray, width: int) -> np.ndarray:
    """Each window's probabilities averaged with its neighbours' (`width` windows, centred).

    A window that holds only the edge of a word is outside what the model was trained on and can be
    confidently wrong; its neighbours, which hold more of the word, outvote it. A word that fills
    many windows keeps its probability."""
    if width <= 1:
        return probs
    kernel = np.ones(width)
    count = np.convolve(np.ones(len(probs)), kernel, mode="same")
    return np.stack([np.convolve(probs[:, k], kernel, mode="same") / count for k in range(probs.shape[1])], axis=1)


def read_audio(source: str, rate: int) -> tuple[np.ndarray, str | None]:
    """Mono float32 audio at `rate` from a file or stdin ("-"); a note when it had to be resampled."""
    import soundfile

    try:
        if source == "-":
            audio, file_rate = soundfile.read(io.BytesIO(sys.stdin.buffer.read()), dtype="float32", always_2d=True)
        else:
            audio, file_rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        name = "stdin" if source == "-" else source
        raise DetectError(f"{name}: cannot read audio ({str(exc).splitlines()[0]}); give a WAV or FLAC file") from None
    audio = audio.mean(axis=1)
    if file_rate == rate:
        return audio, None
    # Linear interpolation: enough for a detector's input; give files at the model's rate for best accuracy.
    times = np.arange(int(round(audio.size * rate / file_rate))) * (file_rate / rate)
    return np.interp(times, np.arange(audio.size), audio).astype(np.float32), \
        f"resampled {file_rate} Hz -> {rate} Hz (linear interpolation)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.export.detect", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model.onnx (or model.int8.onnx) written by the kit's ONNX export")
    parser.add_argument("audio", help="a WAV or FLAC file, or - for stdin")
    parser.add_argument("--threshold", type=float, default=0.8, help="lowest probability that counts (default 0.8)")
    parser.add_argument("--hop-s", type=float, default=None, help="seconds between windows (default: the model's)")
    parser.add_argument("--refractory-s", type=float, default=1.0,
                        help="seconds after a detection in which others are dropped (default 1.0)")
    parser.add_argument("--min-dbfs", type=float, default=-50.0,
                        help="quietest window level considered, in dB full scale (default -50)")
    parser.add_argument("--smooth-s", type=float, default=0.3,
                        help="probabilities averaged over this many seconds of neighbouring windows (default 0.3)")
    parser.add_argument("--ignore", nargs="*", default=[], metavar="LABEL",
                        help="labels never reported (e.g. _silence_ _unknown_)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    args = parser.parse_args(argv)
    try:
        if not 0 < args.threshold <= 1:
            raise DetectError(f"--threshold {args.threshold}: must be in (0, 1]")
        if args.hop_s is not None and args.hop_s <= 0:
            raise DetectError(f"--hop-s {args.hop_s}: must be > 0 seconds")
        if args.audio != "-" and not Path(args.audio).is_file():
            raise DetectError(f"{args.audio}: no such file")
        if not Path(args.model).is_file():
            raise DetectError(f"{args.model}: no such file (export a student with python -m kd.export.onnx)")
        model = KeywordModel.load(args.model, args.threads)
        unknown = [name for name in args.ignore if name not in model.labels]
        if unknown:
            raise DetectError(f"--ignore {' '.join(unknown)}: not a label of the model ({', '.join(model.labels)})")
        audio, note = read_audio(args.audio, model.sample_rate)
    except DetectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hop = max(1, int(round(args.hop_s * model.sample_rate))) if args.hop_s else model.hop
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(f"# {audio.size / model.sample_rate:.1f} s of audio, window {model.window / model.sample_rate:.2f} s, "
          f"hop {hop / model.sample_rate:.3f} s, threshold {args.threshold}", file=sys.stderr)
    for d in detect(model, audio, hop, threshold=args.threshold, refractory_s=args.refractory_s,
                    min_dbfs=args.min_dbfs, ignore=tuple(args.ignore),
                    smooth_s=args.smooth_s):
        print(d.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
