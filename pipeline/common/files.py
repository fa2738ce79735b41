"""JSON records on any file system (local or fsspec URLs) and storage paths Ray workers can reach."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec


def resolve_storage(storage_path: str) -> str:
    """Local storage paths made absolute (Ray workers run in other directories); URIs as given."""
    return storage_path if "://" in storage_path else str(Path(storage_path).expanduser().resolve())


def read_json(uri: str) -> Any:
    """A JSON file, local or on any fsspec filesystem; None when it does not exist."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def write_json(uri: str, data: Any) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(data, f, indent=2)
