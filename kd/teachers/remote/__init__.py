"""A teacher behind an OpenAI-compatible server: the soft-target source, its HTTP client, what each mode
asks, the wire format, the answers on disk, and a server for a local model (`python -m kd.teachers.remote.server`)."""
