"""Audio: the kit's log-mel CNN, teacher features computed on the device, waveform augmentation, clip storage
without torchcodec, and Speech Commands read from its official archive."""
