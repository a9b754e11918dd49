"""Sample figures of a suite: a per-run grid (one row per class) and a combined figure (one row per
run, one column per class, the runs' labels on the left), for every kind of data the toolkit has.

Images are drawn as they are; latents are decoded when the run knows its VAE (``data.vae``) and
otherwise shown as their first three channels (a rough look, as in training previews); 2-D vector
data (the toy sets) become one density picture per class (``TOY_POINTS`` samples each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from onestep.utils.atomic import atomic_write
from onestep.viz import density_image, to_uint8_images

TOY_POINTS = 2000  # samples in each density tile of vector data
TOY_TILE = 160  # its side in pixels


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def class_tiles(
    run_dir, per_class: int, nfe: int, guidance: float | None = None, seed: int = 0, upscale: int = 2
) -> list[list[Image.Image]]:
    """One list of tiles per class (one list when the model is unconditional): ``per_class`` pictures
    of single samples for image and latent data, one density picture of ``TOY_POINTS`` samples for
    vector data."""
    from onestep.api import generate, load_model

    model = load_model(str(run_dir), guidance=guidance)
    classes = max(model.num_classes, 1)
    vector = model.data.kind not in ("image", "latent")
    if vector and len(model.data_shape) != 1:
        raise ValueError(f"cannot draw samples of shape {model.data_shape} ({model.data.kind} data)")
    count = TOY_POINTS if vector else per_class
    labels = torch.arange(classes).repeat_interleave(count) if model.num_classes else None
    x, _ = generate(model, count * classes, nfe=nfe, y=labels, seed=seed)
    rows = []
    for k in range(classes):
        part = x[k * count : (k + 1) * count]
        if vector:
            rows.append([density_image(part).resize((TOY_TILE, TOY_TILE), Image.BILINEAR)])
            continue
        if model.data.kind == "latent":
            part = model.decode(part) if model.decode is not None else (part[:, :3] / 4).clamp(-1, 1)
        images = to_uint8_images(part)
        rows.append([_image(img, upscale) for img in images])
    return rows


def _image(img: np.ndarray, upscale: int) -> Image.Image:
    tile = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    return tile.resize((tile.width * upscale, tile.height * upscale), Image.NEAREST)


def label_font() -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, bool]:
    """The font of the grids' labels and whether it draws any Unicode letter: matplotlib's DejaVu Sans
    (Greek included: "α-Flow") where matplotlib is installed, else Pillow's default font (Latin only)."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 11), True
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default(), False


def latin_label(text: str) -> str:
    """``text`` for a font without Greek: each letter outside Latin-1 spelled by its Unicode name's
    last word ("α-Flow" -> "alpha-Flow"), never a missing-glyph box."""
    import unicodedata

    return "".join(c if ord(c) < 256 else unicodedata.name(c, "?").split()[-1].lower() for c in text)


def _canvas(rows: list[list[Image.Image]], labels: list[str] | None, header: list[str] | None) -> Image.Image:
    """Tiles in rows (all tiles scaled to the first tile's height), labels on the left, a header row."""
    pad = 2
    h = rows[0][0].height
    rows = [[t if t.height == h else t.resize((max(1, t.width * h // t.height), h)) for t in row] for row in rows]
    font, unicode = label_font()
    if not unicode:
        labels = None if labels is None else [latin_label(s) for s in labels]
        header = None if header is None else [latin_label(s) for s in header]
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    label_w = 8 + max(int(measure.textlength(s, font=font)) for s in labels) if labels else 0
    head = 14 if header else 0
    width = label_w + max(sum(t.width + pad for t in row) for row in rows) + pad
    rgb = any(t.mode != "L" for row in rows for t in row)
    canvas = Image.new("RGB" if rgb else "L", (width, head + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    tile_w = rows[0][0].width
    for j, name in enumerate(header or []):
        draw.text((label_w + pad + j * (tile_w + pad), 1), name[: max(1, tile_w // 6)], fill=0, font=font)
    for i, row in enumerate(rows):
        top = head + pad + i * (h + pad)
        if labels:
            draw.text((4, top + h // 2 - 5), labels[i], fill=0, font=font)
        left = label_w + pad
        for tile in row:
            canvas.paste(tile.convert(canvas.mode), (left, top))
            left += tile.width + pad
    return canvas


def class_grid(
    run_dir, path: str | Path, *, per_class: int = 10, nfe: int = 1, guidance: float | None = None, seed: int = 0
) -> Path:
    """Write a PNG with one row per class and ``per_class`` samples in each (a density picture per
    class for vector data)."""
    rows = class_tiles(run_dir, per_class, nfe, guidance, seed)
    _save_png(_canvas(rows, None, None), Path(path))
    return Path(path)


def combined_grid(
    runs: list[tuple[str, Path | str, int, float | None]],
    path: str | Path,
    *,
    seed: int = 0,
    class_names: list[str] | None = None,
) -> Path:
    """One row per (label, run_dir, nfe, guidance): that run's first sample of each class (for vector
    data, its density picture of each class)."""
    rows, labels = [], []
    for label, run_dir, nfe, guidance in runs:
        rows.append([tiles[0] for tiles in class_tiles(run_dir, 1, nfe, guidance, seed)])
        labels.append(label)
    if not rows:
        raise ValueError("combined grid: no runs to draw")
    _save_png(_canvas(rows, labels, class_names), Path(path))
    return Path(path)
