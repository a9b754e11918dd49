"""Sample figures of class-conditional runs: a per-run grid (one row per class) and a combined figure
(one row per run, one column per class, the runs' labels on the left)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from onestep.utils.atomic import atomic_write
from onestep.viz import image_grid, to_uint8_images


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def class_samples(run_dir, per_class: int, nfe: int, guidance: float | None = None, seed: int = 0):
    """(per_class * C images (N, C, H, W) in [-1, 1], number of classes C): ``per_class`` samples of
    each class, class-major (one sample per class when the model is unconditional: C = 1 row)."""
    from onestep.api import generate, load_model

    model = load_model(str(run_dir), guidance=guidance)
    classes = max(model.num_classes, 1)
    labels = torch.arange(classes).repeat_interleave(per_class) if model.num_classes else None
    x, _ = generate(model, per_class * classes, nfe=nfe, y=labels, seed=seed)
    return x, classes


def class_grid(
    run_dir,
    path: str | Path,
    *,
    per_class: int = 10,
    nfe: int = 1,
    guidance: float | None = None,
    seed: int = 0,
    upscale: int = 2,
) -> Path:
    """Write a PNG with one row per class and ``per_class`` samples in each."""
    x, _ = class_samples(run_dir, per_class, nfe, guidance, seed)
    _save_png(image_grid(x, ncol=per_class, upscale=upscale, pad=2), Path(path))
    return Path(path)


def combined_grid(
    rows: list[tuple[str, Path | str, int, float | None]],
    path: str | Path,
    *,
    seed: int = 0,
    upscale: int = 2,
    class_names: list[str] | None = None,
) -> Path:
    """One row per (label, run_dir, nfe, guidance): that run's first sample of each class."""
    strips, labels = [], []
    for label, run_dir, nfe, guidance in rows:
        x, _ = class_samples(run_dir, 1, nfe, guidance, seed)
        strips.append(to_uint8_images(x))
        labels.append(label)
    if not strips:
        raise ValueError("combined grid: no runs to draw")
    n, h, w, c = strips[0].shape
    h, w, pad = h * upscale, w * upscale, 2
    font = ImageFont.load_default()
    label_w = 8 + max(int(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(s, font=font)) for s in labels)
    head = 14 if class_names else 0
    canvas = Image.new(
        "L" if c == 1 else "RGB", (label_w + n * (w + pad) + pad, head + len(strips) * (h + pad) + pad), 255
    )
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(class_names or []):
        draw.text((label_w + pad + j * (w + pad), 1), name[: max(1, w // 6)], fill=0, font=font)
    for i, (label, strip) in enumerate(zip(labels, strips)):
        top = head + pad + i * (h + pad)
        draw.text((4, top + h // 2 - 5), label, fill=0, font=font)
        for j, img in enumerate(strip):
            tile = Image.fromarray(img[..., 0] if c == 1 else img).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + j * (w + pad), top))
    _save_png(canvas, Path(path))
    return Path(path)
