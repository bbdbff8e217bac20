"""Audio model inputs computed in batches on the device, instead of per clip in the DataLoader.

A transformers audio model comes with a feature extractor that works on one NumPy clip at a time
(the AST filterbank is a Kaldi fbank call per clip). In the DataLoader workers that is CPU time on
every sample of every epoch, and for AST it is the data path's bottleneck. The modules here do the
same arithmetic on a whole (batch, samples) tensor wherever the consuming model lives, and give the
same numbers as the extractor they replace (tests/test_fast_path.py compares them).

`device_features(processor)` returns the module for a supported extractor and None otherwise; the
kit then keeps the extractor in the collate function (data.features_on_device: false does that too).
"""

from __future__ import annotations

from typing import Any

import torch
import torchaudio.compliance.kaldi as kaldi
from torch import nn
from transformers import ASTFeatureExtractor, Wav2Vec2FeatureExtractor


class DeviceFeatures(nn.Module):
    """waveform (batch, samples), float32 -> the model's input dict, computed without autograd."""

    def forward(self, waveform: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad(), torch.autocast(device_type=waveform.device.type, enabled=False):
            return self.compute(waveform.float())

    def compute(self, waveform: torch.Tensor) -> dict[str, torch.Tensor]:  # each extractor's arithmetic
        raise NotImplementedError


class Wav2Vec2Inputs(DeviceFeatures):
    """Wav2Vec2FeatureExtractor (also HuBERT, WavLM): per-clip zero mean and unit variance.

    Clips reach the kit cut or zero-padded to one length, so the extractor sees no padding of its
    own and normalises over the whole clip; so does this.
    """

    def __init__(self, extractor: Wav2Vec2FeatureExtractor):
        super().__init__()
        self.do_normalize = extractor.do_normalize
        self.attention_mask = bool(extractor.return_attention_mask)

    def compute(self, waveform: torch.Tensor) -> dict[str, torch.Tensor]:
        values = waveform
        if self.do_normalize:
            var, mean = torch.var_mean(waveform, dim=-1, correction=0, keepdim=True)
            values = (waveform - mean) / torch.sqrt(var + 1e-7)
        out = {"input_values": values}
        if self.attention_mask:
            out["attention_mask"] = torch.ones(waveform.shape, dtype=torch.int32, device=waveform.device)
        return out


class ASTInputs(DeviceFeatures):
    """ASTFeatureExtractor: Kaldi log-mel filterbank (hanning window), padded or cut, then normalised.

    The same steps as torchaudio.compliance.kaldi.fbank with the extractor's options (25 ms frames,
    10 ms shift, DC offset removed, pre-emphasis 0.97, power spectrum of a 512-point FFT, Kaldi
    mel banks from 20 Hz to Nyquist, log floored at float epsilon), over all clips of a batch at once.
    """

    frame_ms, shift_ms, preemphasis, low_freq = 25.0, 10.0, 0.97, 20.0

    def __init__(self, extractor: ASTFeatureExtractor):
        super().__init__()
        rate = extractor.sampling_rate
        self.frame = int(rate * self.frame_ms / 1000)
        self.shift = int(rate * self.shift_ms / 1000)
        self.n_fft = 1 << (self.frame - 1).bit_length()
        self.max_length = extractor.max_length
        self.do_normalize = extractor.do_normalize
        self.mean, self.std = extractor.mean, extractor.std
        banks, _ = kaldi.get_mel_banks(extractor.num_mel_bins, self.n_fft, float(rate), self.low_freq, 0.0,
                                       100.0, -500.0, 1.0)
        # Kaldi's banks cover n_fft/2 bins; the Nyquist bin gets weight 0, as in kaldi.fbank.
        self.register_buffer("mel_banks", nn.functional.pad(banks, (0, 1)).T.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(self.frame, periodic=False), persistent=False)

    def compute(self, waveform: torch.Tensor) -> dict[str, torch.Tensor]:
        frames = waveform.unfold(-1, self.frame, self.shift)  # (batch, n_frames, frame)
        frames = frames - frames.mean(dim=-1, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - self.preemphasis * previous) * self.window
        power = torch.fft.rfft(frames, n=self.n_fft).abs().pow(2)
        fbank = torch.clamp_min(power @ self.mel_banks, torch.finfo(torch.float32).eps).log()
        n = fbank.shape[1]
        if n < self.max_length:  # zero rows after the log, as the extractor pads
            fbank = nn.functional.pad(fbank, (0, 0, 0, self.max_length - n))
        fbank = fbank[:, :self.max_length]
        if self.do_normalize:
            fbank = (fbank - self.mean) / (self.std * 2)
        return {"input_values": fbank}


SUPPORTED = ((ASTFeatureExtractor, ASTInputs), (Wav2Vec2FeatureExtractor, Wav2Vec2Inputs))


def device_features(processor: Any) -> DeviceFeatures | None:
    """The on-device twin of an audio feature extractor, or None where there is none."""
    for extractor_cls, module_cls in SUPPORTED:
        if type(processor) is extractor_cls:  # exact type: a subclass may compute something else
            return module_cls(processor)
    return None
