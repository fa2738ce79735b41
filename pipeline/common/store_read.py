"""Reading windows of a task store's arrays (the layout is `pipeline.common.store`'s).

`ShardReader` reads the layout ingest writes (one shard per array, index first, checksummed Blosc
chunks) straight from the bytes: a window reads, checks (CRC32C) and decodes only the chunks it
touches, fetched through `ByteRanges`. Any other Zarr array (a store written by hand) is read
through zarr-python (`ZarrReader`). Every problem is a `StoreError` naming the store, case and array.
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Any

import fsspec
import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, Endian, ShardingCodec, ShardingCodecIndexLocation

REINGEST_HINT = "re-ingest it: python -m pipeline.ingest --source DIR --out ROOT --overwrite"
_ABSENT = 2**64 - 1  # shard index entry of a chunk that was never written

# Blosc decodes on the calling thread. numcodecs would otherwise use blosc's thread pool when
# called from a main thread (zarr-python always calls it from worker threads, where it does
# not): data-loader workers are the parallelism, and the pool cost ~15% more CPU and wall time
# per patch with 64^3 chunks on 2 cores.
blosc.use_threads = False


class StoreError(ValueError):
    """A store that cannot be read; the message names the store and the problem."""


class ByteRanges:
    """Byte ranges of one store's objects: `os.pread` on a local path, fsspec's `cat_ranges`
    (concurrent requests on S3 and other async filesystems) for a URL. Ranges less than a gap
    apart become one read (a patch's chunks mostly lie side by side in the shard)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None):
        self._fs, self._root = (fsspec.core.url_to_fs(uri, **(storage_options or {})) if "://" in uri
                                else (None, uri))
        # bytes worth reading through rather than asking again: about a syscall locally, a request remotely
        self._gap = 4096 if self._fs is None else 1 << 20

    def ranges(self, key: str, spans: list[tuple[int, int]]) -> list[np.ndarray]:
        """The bytes of each span, as uint8 views (google_crc32c and blosc read them without a copy)."""
        merged: list[list] = []  # [start, stop, indexes of the spans inside]
        for n in sorted(range(len(spans)), key=lambda n: spans[n][0]):
            start, stop = spans[n]
            if merged and start - merged[-1][1] <= self._gap:
                merged[-1][1] = max(merged[-1][1], stop)
                merged[-1][2].append(n)
            else:
                merged.append([start, stop, [n]])
        out: dict[int, np.ndarray] = {}
        for (start, _, members), blob in zip(merged, self._read(f"{self._root}/{key}", merged)):
            view = np.frombuffer(blob, dtype=np.uint8)
            for n in members:
                out[n] = view[spans[n][0] - start:spans[n][1] - start]
        return [out[n] for n in range(len(spans))]

    def _read(self, path: str, spans: list[list]) -> list[bytes]:
        if self._fs is not None:
            return self._fs.cat_ranges([path] * len(spans), [s[0] for s in spans], [s[1] for s in spans],
                                       on_error="raise")
        fd = os.open(path, os.O_RDONLY)
        try:
            return [os.pread(fd, stop - start, start) for start, stop, _ in spans]
        finally:
            os.close(fd)


class ShardReader:
    """Windows of an array written as one shard of checksummed Blosc chunks (the writer's
    layout): reads, checks (CRC32C) and decodes just the chunks a window touches, without
    zarr-python's per-chunk machinery. `where` names the store, case and array in errors."""

    def __init__(self, array: zarr.Array, data: ByteRanges, where: str, empty: bool):
        self.shape, self.dtype, self.fill_value = array.shape, array.dtype, array.fill_value
        self.chunks: tuple[int, ...] = array.metadata.codecs[0].chunk_shape
        self.key = f"{array.path}/{array.metadata.encode_chunk_key((0,) * array.ndim)}"
        self.where, self._empty = where, empty
        self._data = data
        self._grid = tuple(-(-s // c) for s, c in zip(array.metadata.chunk_grid.chunk_shape, self.chunks))
        self._strides = [int(np.prod(self._grid[d + 1:])) for d in range(len(self._grid))]
        self._index: np.ndarray | None = None  # (chunks, 2) offsets and lengths, read on first use

    def _read_index(self) -> np.ndarray:
        size = 16 * int(np.prod(self._grid))
        try:
            raw = self._data.ranges(self.key, [(0, size + 4)])[0]
        except FileNotFoundError:
            if not self._empty:
                raise StoreError(f"{self.where}: shard {self.key} is missing; {REINGEST_HINT}") from None
            return np.full((size // 16, 2), _ABSENT, dtype=np.uint64)  # all zero (a label of background): not written
        if len(raw) != size + 4 or not checksum_ok(raw):
            raise StoreError(f"{self.where}: damaged shard index of {self.key} (CRC32C mismatch or truncated); "
                             f"{REINGEST_HINT}")
        return np.frombuffer(raw[:size].tobytes(), dtype="<u8").reshape(-1, 2)

    @staticmethod
    def supports(array: zarr.Array) -> bool:
        """Whether `array` is one shard, index first, of little-endian Blosc chunks with CRC32C."""
        codecs = array.metadata.codecs
        if (len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or sys.byteorder != "little"
                or array.dtype.kind not in "biuf"):
            return False
        shard = codecs[0]
        inner, index = shard.codecs, shard.index_codecs
        return (
            all(s >= n for s, n in zip(array.metadata.chunk_grid.chunk_shape, array.shape))
            and shard.index_location == ShardingCodecIndexLocation.start
            and [type(c) for c in inner] == [BytesCodec, BloscCodec, Crc32cCodec]
            and inner[0].endian in (None, Endian.little)
            and [type(c) for c in index] == [BytesCodec, Crc32cCodec] and index[0].endian == Endian.little
        )

    def read(self, source: tuple[slice, ...], out: np.ndarray) -> None:
        """Fill `out` with the array's values at `source` (slices inside the array, steps of 1)."""
        axes = [
            [(i * k, slice(max(s.start, i * c) - s.start, min(s.stop, i * c + c) - s.start),
              slice(max(s.start - i * c, 0), min(s.stop - i * c, c)))
             for i in range(s.start // c, (s.stop - 1) // c + 1)]
            for s, c, k in zip(source, self.chunks, self._strides)
        ]
        cells = list(itertools.product(*axes))
        positions = [sum(cell[d][0] for d in range(len(cell))) for cell in cells]
        if self._index is None:
            self._index = self._read_index()
        offsets, lengths = self._index[positions, 0].tolist(), self._index[positions, 1].tolist()
        present = [n for n, offset in enumerate(offsets) if offset != _ABSENT]
        spans = [(offsets[n], offsets[n] + lengths[n]) for n in present]
        blobs = self._data.ranges(self.key, spans) if spans else []
        chunk = np.empty(self.chunks, dtype=self.dtype)
        for n, blob in zip(present, blobs):
            self._decode(blob, chunk, positions[n])
            out[tuple(a[1] for a in cells[n])] = chunk[tuple(a[2] for a in cells[n])]
        if len(present) < len(cells):
            for n in set(range(len(cells))) - set(present):
                out[tuple(a[1] for a in cells[n])] = self.fill_value

    def _decode(self, blob: np.ndarray, chunk: np.ndarray, position: int) -> None:
        """Check a chunk's trailing CRC32C, then decompress it into `chunk`."""
        problem = None if len(blob) > 4 and checksum_ok(blob) else "CRC32C mismatch"
        if problem is None:
            try:
                blosc.decompress(blob[:-4], chunk)
            except RuntimeError as err:  # a checksum collision, or a writer bug
                problem = str(err)
        if problem is not None:
            coords = tuple(int(i) for i in np.unravel_index(position, self._grid))
            raise StoreError(f"{self.where}: chunk {coords} of {self.key} is corrupt ({problem}); {REINGEST_HINT}")


def checksum_ok(data: np.ndarray) -> bool:
    """Whether the last 4 bytes of `data` are the CRC32C (little endian) of the rest, as the
    Zarr v3 `crc32c` codec writes them."""
    return google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:].tobytes(), "little")


class ZarrReader:
    """Windows of any other Zarr array (stores written by hand), through zarr-python: slower.
    zarr-python checks the `crc32c` codec if the array has one."""

    def __init__(self, array: zarr.Array, where: str):
        self.shape, self.dtype, self.where, self._array = array.shape, array.dtype, where, array

    def read(self, source: tuple[slice, ...], out: np.ndarray) -> None:
        out[...] = zarr_read(self._array, source, self.where)


def zarr_read(array: zarr.Array, selection: Any, where: str) -> np.ndarray:
    """`array[selection]`; a corrupt or unreadable chunk becomes a StoreError naming `where`."""
    try:
        return array[selection]
    except (ValueError, RuntimeError, OSError) as err:
        raise StoreError(f"{where}: cannot read ({type(err).__name__}: {' '.join(str(err).split())}); "
                         f"{REINGEST_HINT}") from None


ArrayReader = ShardReader | ZarrReader
