"""GPU telemetry: NVML sampling (with a stand-in pynvml), and its absence on a machine without a driver."""

from __future__ import annotations

import sys
import time
import types

import pytest
import torch

from kd.memory import GpuSampler, PhasePeaks


def test_no_gpu_means_no_readings_and_no_failure():
    sampler = GpuSampler(torch.device("cpu"))
    assert not sampler.available and sampler.read() is None
    sampler.close()
    peaks = PhasePeaks(torch.device("cpu"))
    peaks.enter("backward")
    assert peaks.epoch_peaks() is None and peaks.run_peak() is None and peaks.snapshot() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver path")
def test_real_pynvml_without_a_driver_is_handled(monkeypatch):
    """nvmlInit raises NVMLError_LibraryNotFound here; the sampler must swallow it."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid=None))
    sampler = GpuSampler(torch.device("cuda", 0))
    assert not sampler.available and sampler.read() is None


def fake_pynvml(calls: list) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    nvml.NVML_TEMPERATURE_GPU = 0
    nvml.nvmlInit = lambda: calls.append("init")
    nvml.nvmlShutdown = lambda: calls.append("shutdown")
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: calls.append(uuid) or "handle"
    nvml.nvmlDeviceGetHandleByIndex = lambda i: "handle"

    def memory(handle):
        calls.append("sample")
        return types.SimpleNamespace(used=3_000_000_000, total=80_000_000_000)

    nvml.nvmlDeviceGetMemoryInfo = memory
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=97)
    nvml.nvmlDeviceGetPowerUsage = lambda h: 250_000  # milliwatts
    nvml.nvmlDeviceGetEnforcedPowerLimit = lambda h: 350_000

    def temperature(handle, sensor):
        raise RuntimeError("not supported on this board")  # one failing query must not lose the others

    nvml.nvmlDeviceGetTemperature = temperature
    return nvml


def test_sampler_reads_in_the_background(monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(calls))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="1234"))
    sampler = GpuSampler(torch.device("cuda", 0), interval_s=0.01)
    assert sampler.available and "GPU-1234" in calls
    reading = sampler.read()
    assert reading == {"util_pct": 97, "power_w": 250.0, "power_limit_w": 350.0, "used_bytes": 3_000_000_000,
                       "total_bytes": 80_000_000_000, "temp_c": None}
    time.sleep(0.1)
    assert calls.count("sample") > 2  # the thread keeps sampling; reading costs the step nothing
    sampler.close()
    assert "shutdown" in calls


@pytest.mark.launches
def test_cpu_run_writes_null_gpu_fields(tmp_path, tone_data, tiny_teacher):
    from kd.telemetry import read_events

    from conftest import run_cli, tiny_config, write_config

    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run", train={"max_steps": 2, "eval_every": 100})
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))])
    assert result.returncode == 0, result.stderr[-2000:]
    steps = [e for e in read_events(tmp_path / "run") if e["type"] == "step"]
    assert all(e["gpu"] is None and e["mem"] is None and e["memory"] is None for e in steps)
    assert read_events(tmp_path / "run")[-1]["peak"] is None
