"""An Audio feature that records where a clip is without importing torchcodec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Audio


class PathAudio(Audio):
    """An Audio feature that stores file paths and bytes without importing torchcodec.

    datasets 5 imports torchcodec (and so needs system FFmpeg) even to record a file's path. We decode
    with soundfile in `decode_audio`, so storing the path is all that is needed.
    """

    def encode_example(self, value: Any) -> dict[str, Any]:
        if isinstance(value, (str, Path)):
            return {"bytes": None, "path": str(value)}
        if isinstance(value, (bytes, bytearray)):
            return {"bytes": bytes(value), "path": None}
        if isinstance(value, dict) and "array" not in value:
            return {"bytes": value.get("bytes"), "path": value.get("path")}
        return super().encode_example(value)
