"""The student shipped: its folder (safetensors, config, labels), ONNX and int8 (`python -m kd.export.onnx`), and
a torch-free streaming detector over an exported model (`python -m kd.export.detect`). Imports nothing here,
so the detector runs where torch is not installed."""
