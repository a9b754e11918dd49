"""Reading pickled data files that are pickled by design (the CIFAR-10 "python version" batches)
without running code: an unpickler that builds only plain containers, strings, bytes, numbers and
numpy arrays. Any other global (a function or class a crafted file asks for, e.g. ``os.system``) is
refused before it is looked up, so nothing in the file can execute."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from onestep.registry import ConfigError


# (module, name) pairs a numpy array needs to be rebuilt (numpy 1.x and 2.x spellings).
# Protocol 2 also writes bytes through _codecs.encode.
def _resolve() -> dict[tuple[str, str], Any]:
    import codecs

    try:
        from numpy import _core
    except ImportError:  # numpy 1.x: the same module under its old name
        from numpy import core as _core

    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = _core.multiarray._reconstruct
        table[(module, "scalar")] = _core.multiarray.scalar
    return table


class PlainUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` allows only what numpy arrays need (module docstring)."""

    _table: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if PlainUnpickler._table is None:
            PlainUnpickler._table = _resolve()
        found = PlainUnpickler._table.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name} (only plain data and numpy arrays are allowed)"
            )
        return found


def load_plain_pickle(path: str | Path, encoding: str = "latin1") -> Any:
    """Unpickle ``path`` with ``PlainUnpickler``; a refused or malformed file is one ConfigError line."""
    data = Path(path).read_bytes()
    try:
        return PlainUnpickler(io.BytesIO(data), encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ConfigError(
            f"{path}: not a plain data pickle ({type(exc).__name__}: {' '.join(str(exc).split())}); refusing to load it"
        ) from None
