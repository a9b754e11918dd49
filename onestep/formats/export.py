"""``onestep export RUN|CKPT --out DIR``: a run's model as a self-contained directory.

    DIR/model.safetensors   the backbone's weights (EMA by default, raw with ema=False), safetensors
    DIR/config.yaml         the run's resolved config; meta.export says what was exported
    DIR/README.md           a model card: what it is, how to sample it, the run's metrics

``DIR`` loads back wherever a checkpoint does (it is the ``onestep`` format: ``onestep sample DIR``,
``onestep eval DIR``, ``objective.teacher: DIR``, ``train.init_from: DIR``, ``load_model(DIR)``),
reading only safetensors and YAML. Training state (optimizer, EMA target, an objective's own
parameters) is not exported: an export samples, teaches and initialises, it does not resume.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..config import to_plain
from ..registry import ConfigError
from ..utils import yamlio
from ..utils.rundir import RunDir, run_of_checkpoint, write_text_atomic
from ..utils.version import versions
from .base import DEFAULT_FORMAT, as_spec
from .onestep import (
    EXPORT_CARD,
    EXPORT_CONFIG,
    EXPORT_FORMAT,
    EXPORT_MANIFEST,
    EXPORT_WEIGHTS,
    file_sha256,
    read_onestep,
)

__all__ = ["export_model", "model_card"]


def _source_run(path: Path, kind: str) -> RunDir | None:
    """The run directory whose metrics.jsonl belongs to the checkpoint read."""
    if kind != "checkpoint":
        return None
    return run_of_checkpoint(path)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_model(source: str | Path, out: str | Path, *, ema: bool = True, force: bool = False) -> Path:
    """Write ``out``/{model.safetensors, config.yaml, README.md} from a run directory or checkpoint
    file (module docstring). A non-empty ``out`` is refused unless ``force``."""
    spec = as_spec(source)
    if spec.format != DEFAULT_FORMAT:
        raise ConfigError(
            f"export takes an onestep run directory or checkpoint, not a '{spec.format}' checkpoint "
            f"(sample or distil it instead)"
        )
    source = spec.path
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out}: the directory is not empty; pick another or pass --force to overwrite")
    ckpt = read_onestep(source, use_ema=ema)
    if not ema and ckpt.weights_name != "model":
        raise ConfigError(f"{source}: no raw weights to export")
    raw = to_plain(dict(ckpt.raw_config))
    meta = dict(raw.get("meta") or {})
    step = ckpt.step
    meta["export"] = {
        "format": EXPORT_FORMAT,
        "step": step,
        "weights": ckpt.weights_name,
        "source": str(ckpt.path),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    meta.setdefault("parameters", sum(v.numel() for v in ckpt.weights.values()))
    raw["meta"] = meta
    # Fresh, contiguous tensors (safetensors refuses shared storage).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in ckpt.weights.items()}
    run = _source_run(ckpt.path, ckpt.kind)
    rows = run.read_metrics() if run is not None else []
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(
        tensors, out / EXPORT_WEIGHTS, {"format": EXPORT_FORMAT, "step": str(step), "weights": ckpt.weights_name}
    )
    write_text_atomic(out / EXPORT_CONFIG, yamlio.safe_dump(raw))
    write_text_atomic(out / EXPORT_CARD, model_card(raw, rows, name=out.name, run_name=run.name if run else None))
    write_text_atomic(
        out / EXPORT_MANIFEST,
        json.dumps({name: file_sha256(out / name) for name in (EXPORT_WEIGHTS, EXPORT_CONFIG)}, indent=1) + "\n",
    )
    return out


# ----------------------------------------------------------------------------------------------
# The model card.


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def _options(section: dict[str, Any], skip: tuple[str, ...] = ("name",)) -> str:
    items = [f"{k}={_fmt(v)}" for k, v in section.items() if k not in skip and v is not None]
    return ", ".join(items) if items else "defaults"


def model_card(raw: dict[str, Any], rows: list[dict[str, Any]], *, name: str, run_name: str | None = None) -> str:
    """README.md of an export: what it is, how to sample it (CLI, Python), the metrics rows."""
    meta = raw.get("meta") or {}
    export = meta.get("export") or {}
    data, backbone, objective = raw.get("data") or {}, raw.get("backbone") or {}, raw.get("objective") or {}
    train = raw.get("train") or {}
    shape = backbone.get("input_shape")
    classes = int(backbone.get("num_classes") or 0)
    params = meta.get("parameters")
    weights = "EMA" if export.get("weights") == "ema" else "raw (not EMA)"
    latents = data.get("name") == "latents"
    nfes = ", ".join(str(n) for n in (raw.get("eval") or {}).get("nfe", [1]))
    lines = [
        f"# {name}",
        "",
        f"A generator trained with onestep: objective `{objective.get('name')}` on backbone "
        f"`{backbone.get('name')}`{f' ({params / 1e6:.2f}M parameters)' if params else ''}, "
        f"{'class-conditional (' + str(classes) + ' classes)' if classes else 'unconditional'}, "
        f"{export.get('step', '?')} training steps; {weights} weights.",
        "",
        "| | |",
        "|---|---|",
        f"| objective | `{objective.get('name')}` ({_options(objective, ('name', 'teacher'))}) |",
        f"| backbone | `{backbone.get('name')}`, {f'{params:,} parameters' if params else 'parameters unknown'} |",
        f"| data | `{data.get('name')}` ({_options(data)}); sample shape {shape}, {classes or 'no'} classes |",
    ]
    if objective.get("teacher"):
        lines.append(f"| teacher | `{objective.get('teacher')}` (guidance {objective.get('teacher_guidance', 1.0)}) |")
    if train.get("init_from"):
        lines.append(f"| initialised from | `{train.get('init_from')}` |")
    lines += [
        f"| training | {export.get('step', '?')} steps of {train.get('steps', '?')}, "
        f"batch {train.get('batch_size', '?')}, "
        f"lr {_fmt(train.get('lr', '?'))}, EMA decay {_fmt(train.get('ema_decay', '?'))}, seed {raw.get('seed', 0)} |",
        f"| weights | {weights} |",
        f"| exported from | {'run `' + run_name + '`, ' if run_name else ''}`{export.get('source', '?')}` |",
        f"| onestep | {(export.get('versions') or {}).get('onestep', '?')} |",
        "",
        "## Files",
        "",
        f"- `{EXPORT_WEIGHTS}`: the backbone's weights (safetensors: loading runs no pickle).",
        f"- `{EXPORT_CONFIG}`: the run's resolved recipe; `meta.export` records the step and weights exported.",
        f"- `{EXPORT_CARD}`: this card.",
        f"- `{EXPORT_MANIFEST}`: the sha256 of the weights and the config, checked when the export is loaded.",
        "",
        "## Sampling",
        "",
        "```bash",
        f"onestep sample {name} --nfe 1 -n 64 --seed 0 --out samples.png",
        f"onestep eval {name} --nfe 1 --num-samples 50000{' --reference REFERENCE' if latents else ''}",
        "```",
        "",
    ]
    if latents:
        lines += [
            "Samples are latents (scale "
            + _fmt(data.get("scale", 0.18215))
            + "): "
            + (f"decoded by the VAE `{data['vae']}`" if data.get("vae") else "pass `--vae NAME_OR_DIR` to decode them")
            + "; `--latents` writes the raw latents.",
            "",
        ]
    lines += [
        "```python",
        "import onestep",
        "",
        f'model = onestep.load_model("{name}", device="cuda")  # or "cpu"',
        "x, y = onestep.generate(model, 64, nfe=1, seed=0)  # the same numbers as `onestep sample`",
    ]
    if latents:
        lines.append("images = model.decode(x) if model.decode else None  # in [-1, 1]")
    lines += ["```", "", f"The recipe's evaluation NFEs: {nfes}.", "", "## Metrics", ""]
    if not rows:
        lines += ["No metrics were recorded for this run (`onestep eval RUN` writes them to RUN/metrics.jsonl).", ""]
    else:
        lines += [
            "From the run's metrics.jsonl (`step` is the training step the row scored; this export is step "
            f"{export.get('step', '?')}).",
            "",
            "| step | nfe | metric | value | samples | weights | seed |",
            "|---:|---:|---|---:|---:|---|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r.get('step', '?')} | {r.get('nfe', '?')} | {r.get('metric', '?')} | "
                f"{_fmt(r.get('value', float('nan')))} | {r.get('num_samples', '?')} | "
                f"{r.get('weights', '?')} | {r.get('seed', '?')} |"
            )
        lines += ["", "Implementations and references:", ""]
        seen = []
        for r in rows:
            entry = (r.get("metric"), r.get("implementation"), r.get("reference"))
            if entry not in seen:
                seen.append(entry)
        for metric, impl, ref in seen:
            lines.append(f"- `{metric}`: {impl}; reference: {ref}")
        lines.append("")
    return "\n".join(lines)
