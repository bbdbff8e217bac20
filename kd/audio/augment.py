"""Waveform augmentation, batched on the device, applied once per training batch.

The teacher and the student see the very same augmented waveform: augmentation runs before the
teacher's features are computed and before either forward, so the soft targets describe exactly
the input the student learns from ("consistent teaching", Beyer et al. 2022, "Knowledge
distillation: a good teacher is patient and consistent"). With mixup, the teacher labels the mixed
clip itself (function matching); the labels are mixed with the same weights for the CE term.

Every transform works on the raw waveform, so it means the same to any front end (the student's
log-mel, an AST filterbank, wav2vec2's raw input): SpecAugment's masks become silenced time
segments and band-stop filtered frequency bands.

Random draws come from generators seeded by (run seed, epoch, batch index, process): a batch is
augmented identically however the run got there (fresh, resumed from a checkpoint, after an
out-of-memory retry at the same micro-batch size). With `views: k` they are seeded per clip by
(run seed, view, clip index) instead, view = epoch mod k: each clip has k fixed augmented versions
whatever batch it lands in, on any process, so a teacher cache can store the soft targets of every
view (kd/teachers/cached.py) and the teacher runs during the first epoch only (its end fills the other
views). Evaluation never calls this module.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from kd.config import AugmentConfig
from kd.data import queued_copy

# Per-clip parameters: on the device in training (one queued copy, to_device), NumPy arrays in one-off use.
Params = torch.Tensor | np.ndarray


class WaveformAugment:
    """`augment(waveform, labels, epoch, index)` -> (augmented waveform, soft targets or None)."""

    def __init__(self, cfg: AugmentConfig, sample_rate: int, num_classes: int, *, seed: int, rank: int = 0):
        self.cfg, self.rate, self.num_classes = cfg, sample_rate, num_classes
        self.seed, self.rank = seed, rank

    def generators(self, epoch: int, index: int, device: torch.device) -> tuple[np.random.Generator, torch.Generator]:
        """Two generators for one batch: NumPy for per-clip parameters, torch (on `device`) for noise."""
        seq = np.random.SeedSequence([self.seed, epoch, index, self.rank])
        small, large = seq.spawn(2)
        noise = torch.Generator(device=device)
        noise.manual_seed(int(large.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
        return np.random.default_rng(small), noise

    def view(self, epoch: int) -> int | None:
        """The fixed version of every clip that `epoch` trains on (None: fresh draws every epoch)."""
        return epoch % self.cfg.views if self.cfg.views else None

    def __call__(self, waveform: torch.Tensor, labels: torch.Tensor, epoch: int, index: int,
                 clips: torch.Tensor | list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment one batch; `clips` (the dataset indices of its rows) is required with views."""
        cfg = self.cfg
        batch, n = waveform.shape
        if cfg.views:
            if clips is None:
                raise ValueError("augment.views draws per clip: the batch's dataset indices are needed")
            draws, noise_seeds = self.draw_views(self.view(epoch), [int(i) for i in clips], n)
            gen = None
        else:
            rng, gen = self.generators(epoch, index, waveform.device)
            draws, noise_seeds = self.draw(rng, batch, n), None
        p = to_device(draws, waveform.device)
        x = waveform.float()
        if cfg.speed > 0:
            x = speed_perturb(x, p["speed"])
        if cfg.shift_s > 0:
            x = time_shift(x, p["shift"].long())
        if cfg.gain_db > 0:
            x = x * p["gain"].to(x.dtype)[:, None]
        if cfg.noise_prob > 0:
            noise = (torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype) if noise_seeds is None
                     else clip_noise(noise_seeds, draws["snr_db"], n, x.device, x.dtype))
            x = add_noise(x, p["snr_db"], noise)
        for i in range(cfg.time_masks):
            x = mask_time(x, p[f"time_start{i}"].long(), p[f"time_width{i}"].long())
        for i in range(cfg.freq_masks):
            x = mask_band(x, p[f"band_low{i}"], p[f"band_high{i}"], self.rate)
        targets = None
        if cfg.mixup_alpha > 0:  # refused with views (kd/config.py): a pair depends on the batch
            perm, weight = p["mix_perm"].long(), p["mix_weight"].to(x.dtype)[:, None]
            x = weight * x + (1 - weight) * x[perm]
            onehot = torch.nn.functional.one_hot(labels, self.num_classes).to(x.dtype)
            targets = weight * onehot + (1 - weight) * onehot[perm]
        return x.to(waveform.dtype), targets

    def draw_views(self, view: int, clips: list[int], n: int) -> tuple[dict[str, np.ndarray], list[int]]:
        """Per-clip parameters of `view` (each clip's own generator, so a clip's version does not depend on
        its batch, its process or the micro-batch size) and a seed for each clip's noise."""
        rows, noise_seeds = [], []
        for clip in clips:
            params, noise = np.random.SeedSequence([self.seed, view, clip]).spawn(2)
            rows.append(self.draw(np.random.default_rng(params), 1, n))
            noise_seeds.append(int(noise.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
        draws = {key: np.concatenate([row[key] for row in rows]) for key in rows[0]} if rows else {}
        return draws, noise_seeds

    def draw(self, rng: np.random.Generator, batch: int, n: int) -> dict[str, np.ndarray]:
        """Every per-clip parameter of one batch, drawn on the host in a fixed order."""
        cfg, out = self.cfg, {}
        if cfg.speed > 0:
            out["speed"] = rng.uniform(1 - cfg.speed, 1 + cfg.speed, batch)
        if cfg.shift_s > 0:
            limit = int(cfg.shift_s * self.rate)
            out["shift"] = rng.integers(-limit, limit + 1, batch)
        if cfg.gain_db > 0:
            out["gain"] = 10 ** (rng.uniform(-cfg.gain_db, cfg.gain_db, batch) / 20)
        if cfg.noise_prob > 0:
            lo, hi = cfg.noise_snr_db
            out["snr_db"] = np.where(rng.random(batch) < cfg.noise_prob, rng.uniform(lo, hi, batch), np.inf)
        for i in range(cfg.time_masks):
            width = (rng.uniform(0, cfg.time_mask_s, batch) * self.rate).astype(int)
            out[f"time_width{i}"], out[f"time_start{i}"] = width, (rng.random(batch) * (n - width + 1)).astype(int)
        for i in range(cfg.freq_masks):
            width = rng.uniform(0, cfg.freq_mask_hz, batch)
            low = rng.random(batch) * np.maximum(self.rate / 2 - width, 0)
            out[f"band_low{i}"], out[f"band_high{i}"] = low, low + width
        if cfg.mixup_alpha > 0:
            lam = rng.beta(cfg.mixup_alpha, cfg.mixup_alpha, batch)
            out["mix_weight"] = np.maximum(lam, 1 - lam)  # each clip stays the larger part of its own mix
            out["mix_perm"] = rng.permutation(batch)
        return out


def to_device(draws: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's parameters on the device in one queued copy, as float64 rows (integers up to 2**53
    exact). One copy per parameter from pageable memory made the host wait for the GPU each time."""
    if not draws:
        return {}
    host = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float64) for v in draws.values()]))
    return dict(zip(draws, queued_copy(host, device)))


def speed_perturb(x: torch.Tensor, factors: Params) -> torch.Tensor:
    """Play clip i at `factors[i]` times its speed (tempo and pitch together), by linear interpolation.

    Centred, so the keyword stays where it was; positions outside the source clip are silence.
    """
    batch, n = x.shape
    t = torch.arange(n, device=x.device, dtype=torch.float32)
    factor = torch.as_tensor(factors, dtype=torch.float32, device=x.device)[:, None]
    src = (t - n / 2) * factor + n / 2  # (batch, n) source positions
    left = src.floor()
    frac = src - left
    left = left.long()
    valid_l = (left >= 0) & (left < n)
    valid_r = (left + 1 >= 0) & (left + 1 < n)
    a = x.gather(1, left.clamp(0, n - 1)) * valid_l
    b = x.gather(1, (left + 1).clamp(0, n - 1)) * valid_r
    return a * (1 - frac) + b * frac


def time_shift(x: torch.Tensor, shifts: Params) -> torch.Tensor:
    """Delay clip i by `shifts[i]` samples (negative: earlier), filling with silence."""
    batch, n = x.shape
    src = torch.arange(n, device=x.device)[None, :] - torch.as_tensor(shifts, device=x.device)[:, None]
    valid = (src >= 0) & (src < n)
    return x.gather(1, src.clamp(0, n - 1)) * valid


def add_noise(x: torch.Tensor, snr_db: Params, noise: torch.Tensor) -> torch.Tensor:
    """`noise` (unit white noise, x's shape) at `snr_db[i]` below clip i's mean power (inf: none for that clip)."""
    power = x.pow(2).mean(dim=1, keepdim=True)
    snr = torch.as_tensor(snr_db, dtype=torch.float64, device=x.device)
    scale = (10 ** (-snr / 20)).to(x.dtype)[:, None]  # 0 where inf
    return x + noise * power.sqrt() * scale


def clip_noise(seeds: list[int], snr_db: np.ndarray, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Unit white noise per clip from its own seed (views); zeros for clips that get none."""
    noise = torch.zeros((len(seeds), n), device=device, dtype=dtype)
    gen = torch.Generator(device=device)
    for row, (seed, snr) in enumerate(zip(seeds, snr_db)):
        if np.isfinite(snr):
            gen.manual_seed(seed)
            noise[row] = torch.randn(n, generator=gen, device=device, dtype=dtype)
    return noise


def mask_time(x: torch.Tensor, start: Params, width: Params) -> torch.Tensor:
    """Silence samples [start[i], start[i] + width[i]) of clip i (SpecAugment's time mask)."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    s = torch.as_tensor(start, device=x.device)[:, None]
    w = torch.as_tensor(width, device=x.device)[:, None]
    return x * ~((t >= s) & (t < s + w))


def mask_band(x: torch.Tensor, low_hz: Params, high_hz: Params, rate: int) -> torch.Tensor:
    """Remove the band [low_hz[i], high_hz[i]) from clip i (SpecAugment's frequency mask)."""
    n = x.shape[1]
    spectrum = torch.fft.rfft(x, dim=1)
    freqs = band_frequencies(n, rate, x.device)[None, :]
    lo = torch.as_tensor(low_hz, dtype=freqs.dtype, device=x.device)[:, None]
    hi = torch.as_tensor(high_hz, dtype=freqs.dtype, device=x.device)[:, None]
    spectrum = spectrum * ~((freqs >= lo) & (freqs < hi))
    return torch.fft.irfft(spectrum, n=n, dim=1)


@functools.lru_cache(maxsize=8)
def band_frequencies(n: int, rate: int, device: torch.device) -> torch.Tensor:
    """The rfft bin frequencies of an n-sample clip, made on the host once and kept on the device."""
    return queued_copy(torch.fft.rfftfreq(n, d=1.0 / rate), device)


def describe(cfg: AugmentConfig) -> str:
    """One line for the console: which transforms are on."""
    parts: list[str] = []
    if cfg.speed > 0:
        parts.append(f"speed x{1 - cfg.speed:g}-{1 + cfg.speed:g}")
    if cfg.shift_s > 0:
        parts.append(f"shift +-{cfg.shift_s:g} s")
    if cfg.gain_db > 0:
        parts.append(f"gain +-{cfg.gain_db:g} dB")
    if cfg.noise_prob > 0:
        parts.append(f"noise {cfg.noise_snr_db[0]:g}-{cfg.noise_snr_db[1]:g} dB SNR (p={cfg.noise_prob:g})")
    if cfg.time_masks:
        parts.append(f"{cfg.time_masks} time mask(s) <= {cfg.time_mask_s:g} s")
    if cfg.freq_masks:
        parts.append(f"{cfg.freq_masks} band mask(s) <= {cfg.freq_mask_hz:g} Hz")
    if cfg.mixup_alpha > 0:
        parts.append(f"mixup Beta({cfg.mixup_alpha:g})")
    if cfg.views:
        parts.append(f"{cfg.views} fixed version(s) of each clip (augment.views)")
    return ", ".join(parts) or "no transform enabled"

