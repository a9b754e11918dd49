"""Pictures of samples: image grids and 2-D density images, written as PNG (PIL; no matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8_images(x: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] (or already uint8) -> uint8 (N, H, W, C)."""
    if x.dtype != torch.uint8:
        x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(x: Tensor, ncol: int | None = None, upscale: int = 1, pad: int = 1) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one picture (upscaled by ``upscale`` with nearest)."""
    imgs = to_uint8_images(x)
    n, h, w, c = imgs.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = imgs[
            i
        ]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    return img


def density_image(
    points: Tensor, extent: float | None = None, bins: int = 200, marker_below: int = 2000
) -> Image.Image:
    """A picture of 2-D points over [-extent, extent]² on a light grid (lines every unit, axes darker).

    Up to ``marker_below`` points are drawn as visible dots (so 16 samples read as 16 dots); more as a
    log-density (dark = dense). ``extent`` defaults to 4.5, widened to fit 99 % of the points."""
    from PIL import ImageDraw

    p = points.detach().float().cpu().numpy()[:, :2]
    if extent is None:
        spread = float(np.quantile(np.abs(p), 0.99)) if len(p) else 0.0
        extent = max(4.5, 1.1 * spread) if np.isfinite(spread) else 4.5
    size = 2 * bins
    if len(p) > marker_below:
        hist, _, _ = np.histogram2d(p[:, 1], p[:, 0], bins=bins, range=[[-extent, extent], [-extent, extent]])
        hist = np.log1p(hist[::-1])
        if hist.max() > 0:
            hist = hist / hist.max()
        img = Image.fromarray((255 * (1 - hist)).astype(np.uint8)).resize((size, size), Image.NEAREST).convert("RGB")
    else:
        img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)

    def px(v: float) -> float:
        return (v + extent) / (2 * extent) * (size - 1)

    for k in range(-int(extent), int(extent) + 1):
        color = (150, 150, 150) if k == 0 else (225, 225, 225)
        draw.line([(px(k), 0), (px(k), size)], fill=color)
        draw.line([(0, size - 1 - px(k)), (size, size - 1 - px(k))], fill=color)
    if len(p) <= marker_below:
        radius = 4 if len(p) <= 256 else 2
        for x, y in p:
            if np.isfinite(x) and np.isfinite(y):
                cx, cy = px(float(x)), size - 1 - px(float(y))
                draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(20, 60, 160))
    draw.rectangle([0, 0, size - 1, size - 1], outline=(120, 120, 120))
    return img


def save_samples_png(x: Tensor, kind: str, path: str | Path, ncol: int | None = None) -> Path:
    """Image data -> grid; 2-D vector data -> density picture."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "latent":  # a rough look at latents (training previews): channels 0-2 as RGB, /4 into [-1, 1]
        x, kind = (x[:, :3] / 4).clamp(-1, 1), "image"
    if kind == "image":
        h = x.shape[-1]
        img = image_grid(x, ncol=ncol, upscale=max(1, 64 // h))
    elif x.ndim == 2 and x.shape[1] >= 2:
        img = density_image(x)
    else:
        raise ValueError(f"cannot draw samples of shape {tuple(x.shape)} (kind {kind}) as PNG; use --out FILE.npz")
    img.save(path)
    return path
