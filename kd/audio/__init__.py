"""Audio data the kit knows by name (kd/audio/speech_commands.py: Speech Commands from its official archive)."""
