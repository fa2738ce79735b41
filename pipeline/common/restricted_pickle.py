"""Read a pickle that may come from anyone (a reference checkpoint's `*.model.pkl` plans) without
running its code: only builtin containers and numbers, OrderedDict, and numpy arrays, dtypes and
scalars are rebuilt; a pickle that asks for anything else (`os.system`, a trainer class) is
refused with one line naming the file and what it asked for, before that object is built.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

ALLOWED: frozenset[tuple[str, str]] = frozenset({
    *(("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
                                      "str", "bytes", "bytearray", "bool", "slice", "range")),
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),  # arrays in protocol 5
})


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asked for a global outside ALLOWED; the message is one line naming the file."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise RefusedPickle(f"{self.source}: refused to load {module}.{name} (only builtin containers and "
                                "numbers, OrderedDict and numpy arrays are read from a pickle)")
        return super().find_class(module, name)


def load_restricted(path: Path | str) -> Any:
    """The object pickled in `path`, rebuilt from ALLOWED types only (RefusedPickle otherwise)."""
    return _RestrictedUnpickler(Path(path).read_bytes(), str(path)).load()
