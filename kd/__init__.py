"""The knowledge-distillation kit: train_kd.py and monitor_tui.py are its entry points."""

import os

# Under a hard memory cap, reserved memory should track allocated memory: expandable segments grow
# the CUDA caching allocator's segments in place instead of keeping many fixed-size blocks. Read
# when CUDA first initialises, so set when the package is imported; a user's own setting wins.
if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"
