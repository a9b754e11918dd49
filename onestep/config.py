"""Recipe schema: typed dataclasses, YAML loading (safe_load), ``key.sub=value`` overrides, validation.

A recipe has the sections ``data``, ``backbone``, ``objective`` (each ``{name: REGISTERED_NAME, **kwargs}``),
``regularizers`` (a list of ``{name, weight, blocks, **kwargs}``), ``train``, ``eval`` and ``seed``.
Component kwargs are validated by binding them to the registered factory's signature; ``train`` and
``eval`` are dataclasses whose field types are checked. Every error is a one-line ``ConfigError``.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from onestep.registry import BACKBONES, DATASETS, LOGGERS, METRICS, OBJECTIVES, REGULARIZERS, ConfigError, check_type
from onestep.utils import yamlio

SECTIONS = ("data", "backbone", "objective", "regularizers", "train", "eval", "seed")
REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256
    # A global batch larger than a finite dataset repeats examples within a batch: refused unless true.
    batch_with_repeats: bool = False
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # sgd: momentum = betas[0]
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decay to 0 over train.steps after warmup
    grad_clip: float | None = None
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # TensorFloat-32 for fp32 matmuls and convolutions on CUDA (no effect on the CPU). Under bf16 it
    # speeds up what stays in fp32, such as MeanFlow's and sCT's JVP target (DiT-B/2 on an H200:
    # MeanFlow's step 470 -> 323 ms, docs/benchmarks.md).
    tf32: bool = False
    device: str = "auto"
    # CPU threads for torch in this run (None: torch's default, one per core). With several runs on
    # one machine give each threads = cores / runs (docs/cli.md, "Several runs on one machine").
    threads: int | None = None
    log_every: int = 50
    sample_every: int = 0
    num_preview: int = 64
    checkpoint_every: int = 1000
    keep_checkpoints: int = 0
    # Steps whose numbered checkpoints are written (besides every checkpoint_every) and never rotated
    # away by keep_checkpoints: the points of a learning curve (``onestep suite`` sets them).
    keep_steps: list[int] = field(default_factory=list)
    init_from: str | None = None
    # torch.compile of the network for the training step (the JVP itself runs on the eager module).
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_backend: str = "inductor"
    # Where the rows go besides stats.jsonl (always on): names or {name, **options} of LOGGERS.
    loggers: list[str | dict[str, Any]] = field(default_factory=lambda: ["jsonl"])


@dataclass
class EvalConfig:
    nfe: list[int] = field(default_factory=lambda: [1])
    # Names or {name, **options} of METRICS (e.g. [fid, {name: kid, subset_size: 100}]); None: per data kind.
    metrics: list[str | dict[str, Any]] | None = None
    num_samples: int = 2000
    batch_size: int = 512
    every: int = 0
    ema: bool = True
    seed: int = 0
    # torch-fidelity metrics (fid, isc, kid, prc): what to compare against instead of the training
    # set (a folder, an .npz of statistics or of arr_0 images, a dataset name) -- required for FID
    # of latent data decoded by data.vae -- and a feature extractor replacing their default.
    reference: str | None = None
    feature_extractor: str | None = None
    # Guidance-conditioned models (improved_meanflow): the guidance scale ω >= 1 given to the network
    # (a list: a sweep, one set of rows per value) and the interval [t_min, t_max] it applies on
    # (default [0, 1]). None: no guidance input (ω = 1).
    guidance: float | list[float] | None = None
    guidance_interval: list[float] | None = None


@dataclass
class Config:
    data: dict[str, Any]
    backbone: dict[str, Any]
    objective: dict[str, Any]
    regularizers: list[dict[str, Any]] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))


# Keys of a regularizer entry that belong to the loop, not to the factory.
REGULARIZER_LOOP_KEYS = ("name", "weight", "blocks")


def to_plain(obj: Any) -> Any:
    """Tuples -> lists, recursively, so configs round-trip through YAML and weights_only pickles."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def find_recipe(recipe: str | Path) -> Path:
    """A path, or a recipe name looked up in ./recipes and the repository's recipes/."""
    path = Path(recipe)
    if path.is_file():
        return path
    for root in (Path.cwd() / "recipes", REPO_RECIPES):
        for cand in (root / f"{recipe}", root / f"{recipe}.yaml"):
            if cand.is_file():
                return cand
    raise ConfigError(f"recipe '{recipe}' not found (a YAML path or a name from `onestep ls recipes`)")


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file as a mapping, with its ``base:`` (another recipe, a path relative to this one)
    merged underneath: mappings merge key by key, anything else (lists included) is replaced by the
    overlay's value. A cycle of bases is refused."""
    path = Path(path)
    try:
        raw = yamlio.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable recipe ({type(exc).__name__}: {exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not a valid recipe (invalid YAML: {str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping with sections {', '.join(SECTIONS)}")
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(
            f"{path}: 'base' must be the path of another recipe (relative to {path.parent}), got {base!r}"
        )
    base_path = (path.parent / base).resolve()
    chain = _chain + (path.resolve(),)
    if base_path in chain:
        cycle = " -> ".join(p.name for p in chain + (base_path,))
        raise ConfigError(f"{path}: recipe bases form a cycle ({cycle})")
    return merge_recipes(load_yaml(base_path, chain), raw)


def merge_recipes(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` on top of ``base``: nested mappings merge, other values replace; a component section
    that names another component (``objective: {name: ...}``) replaces the base's section whole."""
    out = dict(base)
    for key, value in overlay.items():
        old = out.get(key)
        same_component = (
            isinstance(value, dict) and isinstance(old, dict) and value.get("name", old.get("name")) == old.get("name")
        )
        out[key] = merge_recipes(old, value) if same_component else value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. train.steps=100)")
    key, value = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': empty key part")
    try:
        parsed = yamlio.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars/lists) to a raw recipe dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node: Any = raw
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                node = _list_item(node, part, where)
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override '{item}': '{where}' is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            idx = _list_index(node, last, ".".join(path))
            node[idx] = value
        else:
            node[last] = value
    return raw


def _list_index(node: list, part: str, where: str) -> int:
    try:
        idx = int(part)
    except ValueError:
        raise ConfigError(f"override: '{where}' indexes a list; use a number 0..{len(node) - 1}") from None
    if not -len(node) <= idx < len(node):
        raise ConfigError(f"override: '{where}' is out of range; the list has {len(node)} entries")
    return idx


def _list_item(node: list, part: str, where: str) -> Any:
    return node[_list_index(node, part, where)]


def _dataclass_from(cls: type, raw: Any, section: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"section '{section}' must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{section}: unknown key '{key}'; allowed: {', '.join(fields)}")
        check_type(value, hints[key], f"{section}.{key}")
    kwargs = {k: (tuple(v) if isinstance(v, list) and "tuple" in str(hints[k]) else v) for k, v in raw.items()}
    return cls(**kwargs)


def _component(raw: Any, section: str, registry) -> dict[str, Any]:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"section '{section}' needs a 'name' (one of: {', '.join(registry.names())})")
    registry.get(raw["name"])  # unknown names list the known ones
    return dict(raw)


def validate_component(registry, entry: dict[str, Any], section: str, exclude: tuple[str, ...] = ("name",)) -> None:
    kwargs = {k: v for k, v in entry.items() if k not in exclude}
    registry.bind(entry["name"], kwargs, where=f"{section} '{entry['name']}'")


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a raw recipe dict."""
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section '{unknown[0]}'; allowed: {', '.join(SECTIONS)}")
    for needed in ("data", "backbone", "objective"):
        if needed not in raw:
            raise ConfigError(f"recipe is missing section '{needed}'")
    data = _component(raw["data"], "data", DATASETS)
    backbone = _component(raw["backbone"], "backbone", BACKBONES)
    objective = _component(raw["objective"], "objective", OBJECTIVES)
    validate_component(DATASETS, data, "data")
    validate_component(BACKBONES, backbone, "backbone")
    validate_component(OBJECTIVES, objective, "objective", exclude=("name", "teacher_ema"))
    if "teacher_ema" in objective:
        check_type(objective["teacher_ema"], bool, "objective.teacher_ema")
    regs_raw = raw.get("regularizers") or []
    if not isinstance(regs_raw, list):
        raise ConfigError("section 'regularizers' must be a list of {name, weight, blocks, ...} entries")
    regularizers = []
    for i, entry in enumerate(regs_raw):
        entry = _component(entry, f"regularizers.{i}", REGULARIZERS)
        entry.setdefault("weight", 1.0)
        entry.setdefault("blocks", "encoder")
        check_type(entry["weight"], float, f"regularizers.{i}.weight")
        blocks = entry["blocks"]
        if not (
            blocks == "encoder"
            or (isinstance(blocks, list) and all(isinstance(b, int) for b in blocks))
            or isinstance(blocks, int)
        ):
            raise ConfigError(f"regularizers.{i}.blocks must be 'encoder' or a list of block indices, got {blocks!r}")
        if isinstance(blocks, int):
            entry["blocks"] = [blocks]
        validate_component(REGULARIZERS, entry, f"regularizers.{i}", exclude=REGULARIZER_LOOP_KEYS)
        regularizers.append(entry)
    train = _dataclass_from(TrainConfig, raw.get("train"), "train")
    evalc = _dataclass_from(EvalConfig, raw.get("eval"), "eval")
    seed = raw.get("seed", 0)
    check_type(seed, int, "seed")
    _check_values(train, evalc)
    if (
        evalc.every
        and data.get("vae")
        and evalc.reference is None
        and set(evalc.metrics or ["fid"]) & {"fid", "kid", "prc"}
    ):
        raise ConfigError(
            "eval.every > 0 scores VAE-decoded samples (data.vae) with fid/kid/prc, which need "
            "eval.reference (an image folder, FID statistics .npz, or ADM reference batch)"
        )
    return Config(
        data=data, backbone=backbone, objective=objective, regularizers=regularizers, train=train, eval=evalc, seed=seed
    )


def _check_values(train: TrainConfig, evalc: EvalConfig) -> None:
    positive = {
        "train.steps": train.steps,
        "train.batch_size": train.batch_size,
        "eval.num_samples": evalc.num_samples,
        "eval.batch_size": evalc.batch_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if train.threads is not None and train.threads < 1:
        raise ConfigError(f"train.threads must be >= 1 (or null for torch's default), got {train.threads}")
    if train.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {train.lr}")
    if not 0.0 <= train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {train.ema_decay}")
    for b in train.betas:
        if not 0.0 <= b < 1.0:
            raise ConfigError(f"train.betas must be in [0, 1), got {list(train.betas)}")
    if any(n < 1 for n in evalc.nfe):
        raise ConfigError(f"eval.nfe entries must be >= 1, got {evalc.nfe}")
    omegas = evalc.guidance if isinstance(evalc.guidance, list) else [evalc.guidance]
    if any(w is not None and not 1.0 <= w < float("inf") for w in omegas) or omegas == []:
        raise ConfigError(
            f"eval.guidance must be a guidance scale >= 1 or a non-empty list of them, got {evalc.guidance}"
        )
    interval = evalc.guidance_interval
    if interval is not None and (len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0):
        raise ConfigError(
            f"eval.guidance_interval must be [t_min, t_max] with 0 <= t_min <= t_max <= 1, got {interval}"
        )
    if interval is not None and evalc.guidance is None:
        raise ConfigError("eval.guidance_interval needs eval.guidance (the guidance scale)")
    for i, spec in enumerate(evalc.metrics or []):
        _check_spec(METRICS, spec, f"eval.metrics.{i}")
    for i, spec in enumerate(train.loggers):
        _check_spec(LOGGERS, spec, f"train.loggers.{i}")


def _check_spec(registry, spec: Any, where: str) -> None:
    """A component named by a string or {name, **options}: the name exists, the options bind."""
    if isinstance(spec, str):
        registry.bind(spec, {}, where=f"{where} '{spec}'")
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        registry.bind(spec["name"], {k: v for k, v in spec.items() if k != "name"}, where=f"{where} '{spec['name']}'")
    else:
        raise ConfigError(f"{where} must be a name or {{name: ..., options}}, got {spec!r}")


def load_config(recipe: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a recipe (path or name), apply overrides, validate."""
    path = find_recipe(recipe)
    raw = apply_overrides(load_yaml(path), overrides or [])
    return from_dict(raw)


def dump_yaml(obj: Any) -> str:
    return yamlio.safe_dump(to_plain(obj))
