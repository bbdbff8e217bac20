"""Offline speech synthesis with eSpeak NG, from the `espeakng-loader` wheel (library and voices).

No system package and no network: the wheel carries libespeak-ng and its data folder, and we call
the C API through ctypes in synchronous mode, collecting the samples from the synthesis callback.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
PARAM_RATE, PARAM_VOLUME, PARAM_PITCH, PARAM_RANGE = 1, 2, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class ESpeak:
    """One eSpeak NG engine for the process (the C library keeps global state)."""

    _instance: "ESpeak | None" = None

    def __new__(cls) -> "ESpeak":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
            cls._instance._init()
        return cls._instance

    def _init(self) -> None:
        try:
            import espeakng_loader
        except ImportError:
            raise RuntimeError("the demo needs espeakng-loader (pip install -e '.[demo]')") from None
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.sample_rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                      espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError("eSpeak NG failed to initialise from the espeakng-loader data folder")
        self.data_path = Path(espeakng_loader.get_data_path())
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept referenced: the C side holds a pointer to it
        self.lib.espeak_SetSynthCallback(self._callback)
        self._libc = ctypes.CDLL(None)  # the process's C library: eSpeak also draws from its rand()

    def _collect(self, wav, n: int, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def variants(self) -> list[str]:
        """Voice variants shipped in the data folder (m1..m7, f1..f5, and named ones)."""
        folder = self.data_path / "voices" / "!v"
        return sorted(p.name for p in folder.iterdir() if p.is_file())

    def synthesize(self, text: str, voice: str, rate_wpm: int = 160, pitch: int = 50, pitch_range: int = 50,
                   seed: int = 0) -> np.ndarray:
        """Speak `text` with `voice` (e.g. "en-us+f3") and return float32 samples at `self.sample_rate`.
        `seed` fixes the noise some voices add; eSpeak keeps other state between calls, so the same
        sequence of calls in a fresh process gives the same samples (what the demo's build relies on)."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        self.lib.espeak_SetParameter(PARAM_RATE, int(rate_wpm), 0)
        self.lib.espeak_SetParameter(PARAM_PITCH, int(pitch), 0)
        self.lib.espeak_SetParameter(PARAM_RANGE, int(pitch_range), 0)
        # Some voices add noise (breath, Klatt's aspiration) from eSpeak's generator and libc's rand().
        # Unseeded, their state carries over from earlier calls and from other libraries in the
        # process, so two builds of the demo data differed in 240 of 3200 clips.
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        self._libc.srand(ctypes.c_uint(seed))
        self._chunks = []
        data = text.encode() + b"\0"
        if self.lib.espeak_Synth(data, len(data), 0, 0, 0, 0, None, None) != 0:
            raise RuntimeError(f"eSpeak NG failed to synthesise {text!r} with {voice!r}")
        samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return samples.astype(np.float32) / 32768.0
