"""The kit's own keyword-spotting CNN and its folder format.

`LogMelCNN` turns raw audio into log-mel features inside its forward pass (torchaudio, on the
model's device), so the data path carries only waveforms. A small one is the flagship student
(about 18k parameters); a wide one, trained by train_kd.py with distillation off, is a teacher
for it (`teacher.model` may name any folder this module writes).

Folder format (written by `kd.export.student.save_student`, read by `load_logmel_cnn`):

    config.json        {"kind": "logmel_cnn", "num_labels", "sample_rate", "n_mels", "channels",
                        "dropout", "normalize", "pool", "stem_stride", "id2label": {"0": name, ...}}
    model.safetensors  the state dict (the STFT window and mel filterbank are rebuilt from the config)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torchaudio
from safetensors.torch import load_file
from torch import nn

from kd.errors import ModelLoadError

KIND = "logmel_cnn"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
NORMALIZATIONS = ("utterance", "batch")
POOLINGS = ("time_max", "avg")
STEM_STRIDES = (1, 2)
# The log floor sits this far below the clip's mean mel power (-30 dB): relative, so that it scales
# with the recording level, and low enough to keep the quiet bins that separate keywords.
RELATIVE_FLOOR = 1e-3


class LogMelCNN(nn.Module):
    """Waveform (batch, samples) -> logits, via log-mel features and depthwise-separable convs.

    Front end (`normalize`):
    - "utterance" (default): log(mel + floor) with the floor relative to the clip's own mean power,
      then each clip's map normalised by its own statistics (mean per mel band over time, one standard
      deviation over the map). Scaling a waveform by any gain leaves the features unchanged, and so
      the prediction; a per-band mean also removes a fixed microphone/channel response.
    - "batch": log(mel + 1e-6) and one learned BatchNorm over the whole map (the kit's first front end,
      kept to load older exports and to measure against): recording level moves every input.

    Pooling (`pool`) of the last feature map into one vector per clip:
    - "time_max" (default): the mean over mel bands, then the maximum over time. The keyword's
      strongest moment decides, however much silence or padding surrounds it.
    - "avg": the mean over the whole map (the first version): a short word in a long, padded clip
      is diluted by its padding.

    `stem_stride` is the stride of the first (full-resolution) convolution. With 1 the stem keeps the
    40 x 101 map of a one-second clip and costs most of a step (its activations, BatchNorm and ReLU
    run at full resolution); 2 halves both axes from the first layer on: the same parameters, about
    3.4-4.2x cheaper training steps on a 2-core CPU (bench/bench_stem.py, bench/RESULTS.md).
    """

    kind = KIND

    def __init__(self, num_labels: int, sample_rate: int = 16000, n_mels: int = 40,
                 channels: tuple[int, ...] | list[int] = (32, 64, 64, 128), dropout: float = 0.1,
                 normalize: str = "utterance", pool: str = "time_max", stem_stride: int = 1):
        super().__init__()
        if normalize not in NORMALIZATIONS or pool not in POOLINGS or stem_stride not in STEM_STRIDES:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, pool one of {POOLINGS} and stem_stride "
                             f"one of {STEM_STRIDES}, got {normalize!r}, {pool!r} and {stem_stride!r}")
        self.config = {"kind": self.kind, "num_labels": num_labels, "sample_rate": sample_rate,
                       "n_mels": n_mels, "channels": list(channels), "dropout": dropout, "normalize": normalize,
                       "pool": pool, "stem_stride": stem_stride}
        self.normalize = normalize
        self.label_names: list[str] | None = None  # known when loaded from a folder
        win = int(round(0.025 * sample_rate))  # 25 ms windows, 10 ms hop: the usual KWS front end
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=1 << (win - 1).bit_length(), win_length=win,
            hop_length=int(round(0.010 * sample_rate)), n_mels=n_mels, power=2.0)
        # The STFT window and mel filterbank follow from the config: keep them out of the state dict.
        # (The periodic Hann window is also a view into a larger tensor, which safetensors refuses.)
        for module in (self.melspec.spectrogram, self.melspec.mel_scale):
            for name, buffer in list(module.named_buffers(recurse=False)):
                module.register_buffer(name, buffer.clone(), persistent=False)
        # A learned scale and shift of the (normalised) features; with "batch" it is the only normalisation.
        self.input_norm = nn.BatchNorm2d(1)
        layers: list[nn.Module] = [nn.Conv2d(1, channels[0], 3, stride=stem_stride, padding=1, bias=False),
                                   nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
                       nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
                       nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(TimeMaxPool() if pool == "time_max" else nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(dropout), nn.Linear(channels[-1], num_labels))
        self.channels_last = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LogMelCNN":
        # Folders exported before these keys existed used the first front end, average pooling and
        # a full-resolution stem.
        return cls(config["num_labels"], config["sample_rate"], config["n_mels"], config["channels"],
                   config["dropout"], config.get("normalize", "batch"), config.get("pool", "avg"),
                   config.get("stem_stride", 1))

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() cast the layers; the STFT window and mel filterbank stay float32
        # (see features()).
        super()._apply(fn, recurse)
        self.melspec.float()
        return self

    @property
    def sample_rate(self) -> int:
        return int(self.config["sample_rate"])

    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        """(batch, samples) -> (batch, 1, n_mels, frames) float32 log-mel features."""
        # The STFT runs in float32 even under fp16/bf16 autocast: half-precision power spectra
        # overflow and lose the quiet bins that distinguish keywords.
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            mel = self.melspec(waveform.float())
            if self.normalize == "batch":
                return torch.log(mel + 1e-6).unsqueeze(1)
            floor = mel.mean(dim=(-2, -1), keepdim=True) * RELATIVE_FLOOR
            logmel = torch.log(mel + floor.clamp_min(torch.finfo(torch.float32).tiny))
            logmel = logmel - logmel.mean(dim=-1, keepdim=True)
            logmel = logmel / (logmel.std(dim=(-2, -1), keepdim=True) + 1e-5)
            return logmel.unsqueeze(1)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        # Features are float32; a half-precision copy of the model (teacher.dtype) takes them in its dtype.
        x = self.input_norm(self.features(waveform).to(self.input_norm.weight.dtype))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.body(x))


class TimeMaxPool(nn.Module):
    """(batch, channels, mels, frames) -> (batch, channels, 1, 1): mean over mel bands, max over time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=2).amax(dim=-1)[..., None, None]


def read_kind(folder: str | Path) -> str | None:
    """The "kind" in a model folder's config.json (None for transformers folders or unreadable files)."""
    try:
        raw = json.loads((Path(folder) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return raw.get("kind") if isinstance(raw, dict) else None


def read_config(folder: str | Path, what: str) -> dict[str, Any]:
    path = Path(folder) / CONFIG_NAME
    try:
        raw = json.loads(path.read_text())
        needed = ("num_labels", "sample_rate", "n_mels", "channels", "dropout")
        missing = [k for k in needed if k not in raw]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        return raw
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what}: {path} is not a readable {KIND} config ({exc}); "
                             "export the model again") from None


def load_logmel_cnn(folder: str | Path, what: str) -> LogMelCNN:
    """Build the model from `folder`/config.json and load `folder`/model.safetensors (nothing else is read).

    The caller checks the folder first (kd.teachers.loading.resolve_model_source refuses pickles and
    truncated safetensors files).
    """
    folder = Path(folder)
    raw = read_config(folder, what)
    model = LogMelCNN.from_config(raw)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelLoadError(f"{what}: {folder} has no {WEIGHTS_NAME}")
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise ModelLoadError(f"{what}: {weights} does not match the architecture in {CONFIG_NAME} "
                             f"({str(exc).splitlines()[0]}); export the model again") from None
    id2label = raw.get("id2label") or {}
    model.label_names = [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(raw["num_labels"])]
    return model
