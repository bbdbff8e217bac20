"""A student you can ship: one ONNX graph from what a deployment has to logits, checked against PyTorch.

    # Export a finished run's student (its config.yaml, one folder up, names the data to check on)
    python -m kd.export.onnx runs/demo-kd/student
    python -m kd.export.onnx runs/demo-kd/student --int8        # also an int8 model, with its accuracy

    # Or at the end of training: export.onnx: true (and export.int8: true) in the run's config

What the graph takes:
- the kit's log-mel CNN and transformers audio students whose feature extractor the kit computes on
  the device (AST, wav2vec2): `waveform`, float32 (batch, samples) at the model's rate; the
  front end (STFT, mel filterbank, normalisation) is inside the graph;
- other transformers students: their own inputs (`input_ids` + `attention_mask`, `pixel_values`, ...).
Batch size (and clip or sequence length) are dynamic. The output is `logits`.

Checked at export on real validation inputs: onnxruntime's logits equal PyTorch's within 1e-4
(absolute, fp32) and the argmax agrees on every one; otherwise the export fails showing the largest
difference, and nothing is written. Files are written atomically beside model.safetensors
(model.onnx, model.int8.onnx) with the label names, input rate and clip length in the metadata
(`kd.labels`, `kd.sample_rate`, `kd.window_samples`, `kd.hop_samples`; read by `python -m kd.export.detect`).

int8 (the log-mel CNN): static quantisation in QDQ format of the convolutions and the classifier,
calibrated on training clips; the front end stays float32 (its power spectra span far more than 8
bits). Its accuracy on the test split is reported next to the float32 model's, with the size ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from kd.atomic import atomic_file
from kd.audio.logmel_cnn import LogMelCNN
from kd.errors import KDError
from kd.export.detect import ort_session

ONNX_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
ATOL = 1e-4  # fp32 logits, onnxruntime vs PyTorch
DEFAULT_HOP_S = 0.1  # the streaming detector's default step between windows


class ExportError(KDError):
    """The ONNX model could not be written or does not compute what the PyTorch student computes."""


@dataclass
class OnnxReport:
    path: str
    size_bytes: int
    checked: int  # validation inputs compared
    max_abs_diff: float
    accuracy: float | None = None  # onnxruntime fp32 on the test split (classifiers)
    int8_path: str | None = None
    int8_size_bytes: int | None = None
    int8_accuracy: float | None = None
    int8_agreement: float | None = None  # share of test inputs where int8 and fp32 predict the same label

    def lines(self) -> list[str]:
        out = [f"ONNX: {self.path} ({self.size_bytes / 1e3:.1f} kB); logits match PyTorch on {self.checked} "
               f"inputs (largest difference {self.max_abs_diff:.1e}, tolerance {ATOL:.0e}), argmax identical"]
        if self.accuracy is not None:
            out.append(f"ONNX fp32 test accuracy {100 * self.accuracy:.2f}%")
        if self.int8_path is not None:
            out.append(f"ONNX int8: {self.int8_path} ({self.int8_size_bytes / 1e3:.1f} kB, "
                       f"{self.int8_size_bytes / self.size_bytes:.2f}x the fp32 size); test accuracy "
                       f"{100 * self.int8_accuracy:.2f}% (fp32 {100 * self.accuracy:.2f}%), "
                       f"same label as fp32 on {100 * self.int8_agreement:.1f}%")
        return out


# ---------------------------------------------------------------------------------------------
# The graph


class WaveformClassifier(nn.Module):
    """A transformers audio model with its feature extractor's arithmetic in front: waveform -> logits."""

    def __init__(self, features: nn.Module, model: nn.Module):
        super().__init__()
        self.features, self.model = features, model

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.model(**self.features.compute(waveform)).logits


class NamedInputsToLogits(nn.Module):
    """A transformers model called with positional tensors (ONNX inputs) in a fixed order of names."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors))).logits


@dataclass
class Graph:
    module: nn.Module
    input_names: list[str]  # ["waveform"] or the transformers model's input names

    @property
    def takes_waveform(self) -> bool:
        return self.input_names == ["waveform"]

    def inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """This graph's inputs from a collated batch (float32 waveform, or the model's inputs)."""
        if self.takes_waveform:
            return {"waveform": batch["waveform"].float().cpu()}
        return {name: batch["inputs"][name].cpu() for name in self.input_names}


def build_graph(model: nn.Module, processor: Any, example: dict[str, Any]) -> Graph:
    """The module to export and its input names, for a student and one collated batch."""
    model = copy.deepcopy(model).float().eval().cpu()  # the caller's model keeps its device and layout
    if isinstance(model, LogMelCNN):
        model.channels_last = False  # a layout for GPU kernels; the ONNX graph keeps the default
        return Graph(model, ["waveform"])
    if "waveform" in example:
        from kd.audio.features import device_features

        features = device_features(processor) if processor is not None else None
        if features is not None:
            return Graph(WaveformClassifier(features, model), ["waveform"])
    names = [k for k, v in example["inputs"].items() if isinstance(v, torch.Tensor)]
    return Graph(NamedInputsToLogits(model, names), names)


def _dynamic_shapes(graph: Graph, inputs: dict[str, torch.Tensor]) -> Any:
    batch = torch.export.Dim("batch")
    if graph.takes_waveform:
        return {"waveform": {0: batch, 1: torch.export.Dim("samples", min=400)}}
    length = torch.export.Dim("length")
    # Every input is batched; sequence inputs (ids, masks) share a dynamic length, images keep their size.
    shapes = [{0: batch, 1: length} if t.dim() == 2 else {0: batch} for t in inputs.values()]
    return {"tensors": tuple(shapes)} if isinstance(graph.module, NamedInputsToLogits) else shapes


# ---------------------------------------------------------------------------------------------
# Export and check


def export_onnx(model: nn.Module, processor: Any, check_batch: dict[str, Any], folder: str | Path,
                *, metadata: dict[str, Any]) -> tuple[Graph, OnnxReport]:
    """Write `folder`/model.onnx (atomically) and check it against PyTorch on `check_batch`."""
    import onnx

    folder = Path(folder)
    graph = build_graph(model, processor, check_batch)
    inputs = graph.inputs(check_batch)
    with torch.no_grad():
        expected = graph.module(*inputs.values()).float().numpy()
    with atomic_file(folder / ONNX_NAME) as tmp:
        try:
            with _quiet():
                torch.onnx.export(graph.module, tuple(inputs.values()), str(tmp), dynamo=True,
                                  input_names=graph.input_names, output_names=["logits"],
                                  dynamic_shapes=_dynamic_shapes(graph, inputs), external_data=False)
        except Exception as exc:  # the exporter raises many kinds; the user needs its cause in one line
            raise ExportError(f"ONNX export of {type(model).__name__} failed: {_cause(exc)}") from None
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
        onnx.save(proto, str(tmp))
        got = run_onnx(ort_session(tmp), {k: v.numpy() for k, v in inputs.items()})
        diff = check_logits(got, expected, inputs.get("attention_mask"))
    path = folder / ONNX_NAME
    return graph, OnnxReport(str(path), path.stat().st_size, len(expected), diff)


def _cause(exc: Exception) -> str:
    """The line of an exporter error that names the cause (torch.onnx puts it under "Exception summary")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    summary = [line for line in lines if line.startswith("<class ")]
    return (summary[0] if summary else f"{type(exc).__name__}: {lines[0] if lines else ''}")[:400]


def check_logits(got: np.ndarray, expected: np.ndarray, mask: torch.Tensor | None = None) -> float:
    """The largest absolute difference; an ExportError past ATOL or where the argmax differs."""
    if got.shape != expected.shape:
        raise ExportError(f"ONNX logits have shape {got.shape}, PyTorch's {expected.shape}")
    diff = np.abs(got.astype(np.float64) - expected)
    keep = np.ones(got.shape[:-1], dtype=bool) if mask is None or got.ndim == 2 else mask.numpy().astype(bool)
    largest = float(diff[keep].max()) if keep.any() else 0.0
    if not np.isfinite(largest) or largest > ATOL:
        where = np.unravel_index(int(np.nanargmax(np.where(keep[..., None], diff, -1))), diff.shape)
        at = tuple(int(i) for i in where)
        raise ExportError(f"ONNX logits differ from PyTorch's by up to {largest:.3g} (at {at}; tolerance {ATOL:g}); "
                          "the exported graph does not compute what the student computes")
    disagree = int(((got.argmax(-1) != expected.argmax(-1)) & keep).sum())
    if disagree:
        raise ExportError(f"ONNX and PyTorch predict different labels on {disagree} of {int(keep.sum())} inputs "
                          f"(largest logit difference {largest:.3g})")
    return largest


def run_onnx(sess, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return sess.run(["logits"], inputs)[0]


def onnx_predictions(sess, graph: Graph, batches: Iterable[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels, true labels) of a classifier over batches."""
    preds, labels = [], []
    for batch in batches:
        inputs = {k: v.numpy() for k, v in graph.inputs(batch).items()}
        preds.append(run_onnx(sess, inputs).argmax(-1))
        labels.append(batch["labels"].numpy())
    return np.concatenate(preds), np.concatenate(labels)


# ---------------------------------------------------------------------------------------------
# int8


def quantize_int8(folder: str | Path, graph: Graph, calibration: Iterable[dict[str, Any]]) -> Path:
    """Write `folder`/model.int8.onnx: static QDQ int8 of the convolutions and the classifier."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not graph.takes_waveform or not isinstance(graph.module, LogMelCNN):
        raise ExportError("export.int8: int8 quantisation is available for the log-mel CNN student "
                          "(student.type: logmel_cnn); export transformers students in fp32")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{k: v.numpy() for k, v in graph.inputs(b).items()} for b in calibration])

        def get_next(self):
            return next(self.batches, None)

    folder = Path(folder)
    with atomic_file(folder / INT8_NAME) as tmp:
        prepared = tmp.with_name(tmp.name + ".pre.onnx")
        try:
            with _quiet():
                quant_pre_process(str(folder / ONNX_NAME), str(prepared), skip_symbolic_shape=True)
                quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=["Conv", "Gemm"], per_channel=True,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        finally:
            prepared.unlink(missing_ok=True)
        import onnx  # the metadata of the fp32 model carries over

        proto, source = onnx.load(str(tmp)), onnx.load(str(folder / ONNX_NAME))
        onnx.helper.set_model_props(proto, {p.key: p.value for p in source.metadata_props})
        onnx.save(proto, str(tmp))
    return folder / INT8_NAME


# ---------------------------------------------------------------------------------------------
# The whole export of a student: model.onnx, checked; optionally model.int8.onnx; test accuracy


def export_student(model: nn.Module, processor: Any, folder: str | Path, data: Any, *, label_names: list[str],
                   modality: str, max_seconds: float, int8: bool = False, check_samples: int = 64,
                   calibration_samples: int = 256, say=print) -> OnnxReport:
    """Export a student to ONNX beside its safetensors (`data`: kd.data.PreparedData of its run)."""
    check_role = "eval" if "eval" in data.splits else "test" if "test" in data.splits else "train"
    check_batch = next(split_batches(data, check_role, check_samples, limit=check_samples))
    metadata: dict[str, Any] = {"kd.modality": modality, "kd.labels": label_names}
    if data.sampling_rate:
        window = int(round(max_seconds * data.sampling_rate))
        metadata.update({"kd.sample_rate": data.sampling_rate, "kd.window_samples": window,
                         "kd.hop_samples": int(round(DEFAULT_HOP_S * data.sampling_rate))})
    split = {"eval": "validation"}.get(check_role, check_role)
    say(f"Exporting the student to ONNX and checking it on {len(check_batch['labels'])} {split} inputs ...")
    graph, report = export_onnx(model, processor, check_batch, folder, metadata=metadata)
    classifier = modality != "causal_lm"
    test_role = "test" if "test" in data.splits else check_role
    if classifier:
        pred, true = onnx_predictions(ort_session(report.path), graph, split_batches(data, test_role))
        report.accuracy = float((pred == true).mean())
    if int8:
        path = quantize_int8(folder, graph, split_batches(data, "train", 32, limit=calibration_samples))
        pred8, _ = onnx_predictions(ort_session(path), graph, split_batches(data, test_role))
        report.int8_path, report.int8_size_bytes = str(path), path.stat().st_size
        report.int8_accuracy, report.int8_agreement = float((pred8 == true).mean()), float((pred8 == pred).mean())
    for line in report.lines():
        say(line)
    return report


def split_batches(data: Any, role: str, batch_size: int = 64, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """A split's samples in order, collated `batch_size` at a time (the first `limit` only, if given)."""
    ds = data.splits[role]
    end = len(ds) if limit is None else min(limit, len(ds))
    for start in range(0, end, batch_size):
        yield data.collate([ds[i] for i in range(start, min(start + batch_size, end))])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's and quantiser's progress prints (the kit says what happened itself)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------
# The command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.export.onnx", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", help="an exported student folder (e.g. runs/demo-kd/student)")
    parser.add_argument("--config", help="the run's config, for the data to check on (default: "
                                         "STUDENT/../config.yaml, written by train_kd.py)")
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx (log-mel CNN)")
    parser.add_argument("--check-samples", type=int, default=64, metavar="N",
                        help="validation inputs compared with PyTorch (default 64)")
    args = parser.parse_args(argv)
    try:
        export_folder(args.student, args.config, int8=args.int8, check_samples=args.check_samples)
        return 0
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def export_folder(student: str | Path, config: str | Path | None = None, int8: bool = False,
                  check_samples: int = 64) -> OnnxReport:
    """Export an existing student folder, checking it on the data of the run that trained it."""
    from kd.build import sampling_rate
    from kd.config import load_config
    from kd.data import prepare_data
    from kd.export.student import load_student
    from kd.teachers.loading import load_processor

    folder = Path(student)
    config = Path(config) if config else folder.parent / "config.yaml"
    if not config.is_file():
        raise ExportError(f"{config} not found: pass --config with the config of the run that trained {folder} "
                          "(its data is what the export is checked on)")
    cfg = load_config(config)
    model, _ = load_student(folder, cfg.data.modality)
    processor = None if isinstance(model, LogMelCNN) else load_processor(str(folder), cfg.data.modality, what="student")
    rate = model.sample_rate if isinstance(model, LogMelCNN) else sampling_rate(cfg, processor)
    data = prepare_data(cfg.data, processor, rate)
    return export_saved_student(folder, processor, cfg, data, int8=int8, check_samples=check_samples)


def export_saved_student(folder: str | Path, processor: Any, cfg: Any, data: Any, *, int8: bool | None = None,
                         check_samples: int | None = None, say=print) -> OnnxReport:
    """model.onnx (and model.int8.onnx) beside a saved student, made from the saved folder itself, so
    what ships is what was saved, whatever wrapped the model in training. `int8` and `check_samples`
    default to the config's export section."""
    from kd.export.student import load_student

    model, labels = load_student(folder, cfg.data.modality)
    try:
        return export_student(model, processor, folder, data, label_names=labels, modality=cfg.data.modality,
                              max_seconds=cfg.data.max_seconds, int8=cfg.export.int8 if int8 is None else int8,
                              check_samples=cfg.export.check_samples if check_samples is None else check_samples,
                              calibration_samples=cfg.export.calibration_samples, say=say)
    except ExportError as exc:
        raise ExportError(f"{exc} (the student itself is saved in {folder})") from None


if __name__ == "__main__":
    sys.exit(main())
