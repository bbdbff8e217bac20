"""An image-classification example made offline: four shapes drawn at random sizes, places and colours on
noisy backgrounds, as an imagefolder (train/validation/test, a folder per label), and the starting
point of a teacher (a ViT config and its image processor).

An image model folder needs its `preprocessor_config.json` (the image processor: size, scaling,
normalisation); the starting folder holds one beside a ViTConfig whose `architectures` names the task.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPES = ("circle", "cross", "square", "triangle")
SIZE = 32
SPLITS = {"train": 150, "validation": 40, "test": 60}  # images per shape


def draw(rng: np.random.Generator, shape: str):
    from PIL import Image, ImageDraw

    background = rng.integers(0, 90, size=3)
    pixels = np.clip(background + rng.normal(0, 40, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    pen = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(140, 256, size=3))
    r = int(rng.integers(4, 11))
    cx, cy = (int(v) for v in rng.integers(r + 1, SIZE - r - 1, size=2))
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        width = max(2, r // 3)
        pen.rectangle([cx - r, cy - width, cx + r, cy + width], fill=colour)
        pen.rectangle([cx - width, cy - r, cx + width, cy + r], fill=colour)
    return image


def build_image_dataset(root: str | Path, per_shape: dict[str, int] | None = None, seed: int = 0) -> Path:
    """`root`/{train,validation,test}/<shape>/<n>.png and `root`/vit-start (config + image processor)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (per_shape or SPLITS).items():
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw(rng, shape).save(folder / f"{i:04d}.png")
    save_vit_start(root / "vit-start", list(SHAPES))
    return root


def save_vit_start(folder: Path, labels: list[str]) -> Path:
    """A ViT classifier's config (4 layers of 96, 8x8 patches of a 32x32 image) and its image processor."""
    from transformers import ViTConfig, ViTImageProcessor

    config = ViTConfig(image_size=SIZE, patch_size=8, hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=192, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={n: i for i, n in enumerate(labels)}, architectures=["ViTForImageClassification"])
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder
