"""Name -> factory registries for every pluggable component.

A component module registers its factories with a decorator::

    @BACKBONES.register("dit_b_2", tags=("dit",))
    def dit_b_2(input_shape=(4, 32, 32), num_classes=0, **kw): ...

The registry is also the validator: ``bind`` checks recipe kwargs against the factory's signature
(names and simple annotated types) before anything is built, and raises ``ConfigError`` with the
allowed names in the message.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import typing
from typing import Any, Callable


class ConfigError(ValueError):
    """A user-facing configuration error: one line saying what is wrong and what is allowed."""


class DataNotFound(ConfigError):
    """A dataset's files are not where the recipe says (``validate`` and ``--dry-run`` carry on without
    the data; ``train`` stops)."""


class Registry:
    """A mapping from snake_case names to factories. Duplicate names are errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str | None = None, **meta: Any) -> Callable:
        """Decorator that registers a factory (a function or a class) under a name.

        Args:
            name: the snake_case name recipes use (default: the factory's ``__name__``).
            **meta: free-form facts about the component that ``onestep ls`` and the builders read
                (for example ``tags=("dit",)``, ``description=...``).

        Returns:
            The decorator; it returns the factory unchanged, so the function stays importable.

        Raises:
            ValueError: the name is already registered in this registry.
        """

        def deco(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._factories:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._factories[key] = fn
            self._meta[key] = dict(meta)
            return fn

        return deco

    def names(self) -> list[str]:
        _load_components()
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        _load_components()
        return name in self._factories

    def get(self, name: str) -> Callable[..., Any]:
        _load_components()
        if not isinstance(name, str) or name not in self._factories:
            close = difflib.get_close_matches(str(name), self._factories, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown {self.kind} '{name}'{hint}; known: {', '.join(sorted(self._factories))}")
        return self._factories[name]

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def bind(self, name: str, kwargs: dict[str, Any], *, where: str | None = None) -> inspect.BoundArguments:
        """Check ``kwargs`` against the factory's signature; return the bound arguments."""
        fn = self.get(name)
        where = where or f"{self.kind} '{name}'"
        sig = inspect.signature(fn)
        params = sig.parameters
        accepts_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        allowed = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for key in kwargs:
            if key not in params and not accepts_var_kw:
                raise ConfigError(f"{where}: unknown key '{key}'; allowed: {', '.join(allowed) or '(none)'}")
        try:
            bound = sig.bind_partial(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        missing = [
            k
            for k, p in params.items()
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k not in kwargs
        ]
        if missing:
            raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")
        hints = _type_hints(fn)
        for key, value in kwargs.items():
            if key in hints:
                check_type(value, hints[key], f"{where}: key '{key}'")
        return bound

    def build(self, name: str, **kwargs: Any) -> Any:
        """Validate the keyword arguments against the factory's signature, then call it.

        Args:
            name: a registered name (an unknown one gets the closest match and the known names).
            **kwargs: the factory's arguments, usually a recipe section without its ``name``.

        Returns:
            What the factory returns (a backbone, an objective, a dataset, a metric, ...).

        Raises:
            ConfigError: an unknown name, an unknown or missing key, a value of the wrong type, or a
                ValueError the factory raised on a bad value, each as one line naming the component.
        """
        self.bind(name, kwargs)
        try:
            return self.get(name)(**kwargs)
        except ConfigError:
            raise
        except ValueError as exc:
            message = str(exc).splitlines()[0] if str(exc) else repr(exc)
            raise ConfigError(f"{self.kind} '{name}': {message}") from None


def _type_hints(fn: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # unresolvable forward references: skip type checks
        return {}


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return " or ".join(_describe(a) for a in args)
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_type(value: Any, tp: Any, where: str) -> None:
    """Raise ConfigError if ``value`` does not fit the (simple) annotation ``tp``."""
    if not _fits(value, tp):
        raise ConfigError(f"{where} must be {_describe(tp)}, got {type(value).__name__} {value!r}")


def _fits(value: Any, tp: Any) -> bool:
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, bool, dict):
        return isinstance(value, tp)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        if origin is tuple:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


BACKBONES = Registry("backbone")
OBJECTIVES = Registry("objective")
REGULARIZERS = Registry("regularizer")
DATASETS = Registry("dataset")
METRICS = Registry("metric")
LOGGERS = Registry("logger")
FORMATS = Registry("checkpoint format")

REGISTRIES = {
    "backbones": BACKBONES,
    "objectives": OBJECTIVES,
    "regularizers": REGULARIZERS,
    "datasets": DATASETS,
    "metrics": METRICS,
    "loggers": LOGGERS,
    "formats": FORMATS,
}

# The packages whose import registers components (plugin discovery by name: the registry imports
# nothing of the layers above it at import time, only when a name is first looked up).
_COMPONENT_PACKAGES = (
    "onestep.backbones",
    "onestep.objectives",
    "onestep.regularizers",
    "onestep.data",
    "onestep.data.latents",
    "onestep.eval",
    "onestep.loggers",
    "onestep.formats",
)
_loaded = False


def _load_components() -> None:
    """Import the component packages once so their decorators run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _COMPONENT_PACKAGES:
        importlib.import_module(mod)
