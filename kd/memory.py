"""Device memory readings for telemetry (PyTorch's allocator view; None off CUDA)."""

from __future__ import annotations

import threading

import torch


def cuda_index(device: torch.device) -> int:
    """The device's index; Accelerate's device is plain "cuda", which some torch.cuda calls refuse."""
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_memory(device: torch.device) -> dict[str, int] | None:
    """Allocated/reserved now and their peaks, in bytes; None when the device is not a GPU."""
    if device.type != "cuda":
        return None
    return {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "peak_allocated": torch.cuda.max_memory_allocated(device),
        "peak_reserved": torch.cuda.max_memory_reserved(device),
    }


def cuda_peaks(device: torch.device) -> dict[str, int] | None:
    mem = cuda_memory(device)
    return None if mem is None else {"allocated": mem["peak_allocated"], "reserved": mem["peak_reserved"]}


class GpuSampler:
    """NVML readings of the training GPU, taken on a background thread every `interval_s`.

    The training step only reads the latest sample (a dict copy), so NVML calls never slow it.
    Without NVML (no driver, no GPU, nvidia-ml-py missing) `read()` returns None and nothing fails.
    NVML sees the whole device: `used_bytes` includes the CUDA context and other processes.
    """

    def __init__(self, device: torch.device, interval_s: float = 1.0):
        self._latest: dict[str, float | int | None] | None = None
        self._stop = threading.Event()
        self._nvml = self._handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, self._find_handle(pynvml, device)
        except Exception:  # NVMLError_LibraryNotFound and friends: no readings, training goes on
            self._nvml = None
            return
        self._sample()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), name="nvml-sampler", daemon=True)
        self._thread.start()

    @staticmethod
    def _find_handle(pynvml, device: torch.device):
        # CUDA_VISIBLE_DEVICES renumbers devices for CUDA but not for NVML: match by UUID when we can.
        props = torch.cuda.get_device_properties(device)
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:
                pass
        return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)

    def _loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._sample()

    def _sample(self) -> None:
        nvml, handle = self._nvml, self._handle

        def read(fn, scale=1.0):
            try:
                value = fn(handle)
                return value * scale if scale != 1.0 else value
            except Exception:
                return None

        memory = read(nvml.nvmlDeviceGetMemoryInfo)
        util = read(nvml.nvmlDeviceGetUtilizationRates)
        self._latest = {
            "util_pct": getattr(util, "gpu", None),
            "power_w": read(nvml.nvmlDeviceGetPowerUsage, 1e-3),
            "power_limit_w": read(nvml.nvmlDeviceGetEnforcedPowerLimit, 1e-3),
            "used_bytes": getattr(memory, "used", None),
            "total_bytes": getattr(memory, "total", None),
            "temp_c": read(lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
        }

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def read(self) -> dict[str, float | int | None] | None:
        return dict(self._latest) if self._latest is not None else None

    def close(self) -> None:
        self._stop.set()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


class PhasePeaks:
    """Peak PyTorch memory per phase of the step (teacher_forward, student_forward, backward,
    optimizer, eval), per epoch and for the whole run. CUDA only; everything is None elsewhere.

    At each phase change the allocator's peak counters (host-side, no device sync) are read into
    the phase that ends and reset for the one that begins.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = device.type == "cuda"
        if self.enabled:
            # The run's peaks start with training: the pre-flight probe's trial step (and loading)
            # ran before, and would otherwise be read into the first phase.
            torch.cuda.reset_peak_memory_stats(device)
        self.current: str | None = None
        self.epoch: dict[str, dict[str, int]] = {}
        self.run: dict[str, dict[str, int]] = {}

    def enter(self, phase: str) -> None:
        if not self.enabled:
            return
        self._close()
        self.current = phase

    def _close(self) -> None:
        if self.current is None:
            return
        peak = {"allocated": torch.cuda.max_memory_allocated(self.device),
                "reserved": torch.cuda.max_memory_reserved(self.device)}
        for table in (self.epoch, self.run):
            old = table.setdefault(self.current, {"allocated": 0, "reserved": 0})
            for key, value in peak.items():
                old[key] = max(old[key], value)
        torch.cuda.reset_peak_memory_stats(self.device)

    def new_epoch(self) -> None:
        self.epoch = {}

    def epoch_peaks(self) -> dict[str, dict[str, int]] | None:
        if not self.enabled:
            return None
        self._close()
        return {phase: dict(v) for phase, v in self.epoch.items()}

    def run_peak(self) -> dict[str, int] | None:
        """The largest allocated / reserved bytes over every phase of the run."""
        if not self.enabled:
            return None
        self._close()
        if not self.run:
            return cuda_peaks(self.device)
        return {key: max(v[key] for v in self.run.values()) for key in ("allocated", "reserved")}

    def snapshot(self) -> dict[str, int] | None:
        """The step line's `mem`: bytes in use now, and this epoch's peaks over all phases."""
        mem = cuda_memory(self.device)
        peaks = self.epoch_peaks()
        if mem is None or not peaks:
            return mem
        mem["peak_allocated"] = max(v["allocated"] for v in peaks.values())
        mem["peak_reserved"] = max(v["reserved"] for v in peaks.values())
        return mem
