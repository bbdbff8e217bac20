"""Causal language models: their data (text, prompt/completion, chat), token-level losses, the shared
vocabulary check, and GGUF conversion (`python -m kd.lm.convert_gguf`)."""
