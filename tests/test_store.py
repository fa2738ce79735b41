"""TaskStore on a hand-built store: known values in, known patches out."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.common import geometry
from pipeline.common.intensity import zscore
from pipeline.common import store_read
from pipeline.common.store import FORMAT_VERSION, StoreError, StoreManifest, TaskStore
from pipeline.ingest import case, writer

SHAPE = (6, 8, 10)
FOREGROUND = (slice(4, 6), slice(6, 8), slice(8, 10))  # a 2x2x2 corner block of class 2


def _arrays() -> tuple[np.ndarray, np.ndarray]:
    image = (np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + 1)[np.newaxis]
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[FOREGROUND] = 2
    return np.concatenate([image, -image]), label


def _manifest(**changes: object) -> StoreManifest:
    fields = dict(
        task_name="Task05_Hand", modalities=("T2", "ADC"), labels={0: "background", 1: "a", 2: "b"},
        target_spacing=(2.0, 1.0, 1.0), normalization=(zscore(), zscore()),
        cases={"c0": "f0", "c1": "f1", "t0": "f2"}, split={"train": ["c0"], "validation": ["c1"]},
        test_cases=("t0",), dataset="Task05_Hand",
    )
    return StoreManifest(**(fields | changes))


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("store") / "Task05_Hand.zarr")
    root = writer.open_store(uri, None, overwrite=False)
    image, label = _arrays()
    _, meta = geometry.preprocess_image(np.ones((2, 10, 8, 6)), np.diag([1.0, 1.0, 2.0, 1.0]), (2.0, 1.0, 1.0),
                                        (zscore(), zscore()))
    locations = case.class_locations(label, 3, 5, np.random.default_rng(0))
    for case_id, arrays in (("c0", (image, label)), ("c1", (image, label)), ("t0", (image, None))):
        sources = [f"imagesTr/{case_id}_0000.nii.gz", f"imagesTr/{case_id}_0001.nii.gz"]
        sources += [f"labelsTr/{case_id}.nii.gz"] if arrays[1] is not None else []
        attrs = {"meta": meta.to_dict(), "source": sources}
        writer.write_case(uri, None, case_id, arrays, attrs, chunk_size=(4, 4, 4),
                          class_locations=locations if arrays[1] is not None else None)
    writer.write_manifest(root, _manifest())
    return uri


def test_manifest_round_trip_and_properties(store_uri: str) -> None:
    store = TaskStore.open(store_uri)
    assert store.manifest == _manifest()
    assert (store.manifest.num_classes, store.manifest.in_channels, store.manifest.format_version) == (3, 2, 3)
    assert store.case_ids("train") == ["c0"] and store.case_ids("validation") == ["c1"]
    assert store.case_ids("test") == ["t0"] and store.case_ids() == ["c0", "c1", "t0"]
    with pytest.raises(ValueError, match="split must be one of"):
        store.case_ids("val")


def test_layout_one_shard_per_array(store_uri: str) -> None:
    case = zarr.open_group(store_uri, mode="r")["cases/c0"]
    image, label, rows = case["image"], case["label"], case["class_locations"]
    assert image.chunks == (2, 4, 4, 4) and image.shards == (2, 8, 8, 12)  # whole volume, chunk multiples
    assert label.chunks == (4, 4, 4) and label.shards == (8, 8, 12)
    assert image.metadata.codecs[0].index_location.value == "start"
    assert image.metadata.codecs[0].codecs[1].cname.value == "lz4"
    assert rows.dtype == np.int32 and rows.shape == (5, 4) and (rows[:, 0] == 2).all()
    assert "class_locations" not in case.attrs and case.attrs["complete"] is True
    assert sorted(p.name for p in Path(store_uri, "cases/c0/image/c").rglob("*") if p.is_file()) == ["0"]


def test_read_case_and_meta(store_uri: str) -> None:
    store = TaskStore.open(store_uri)
    image, label = store.read_case("c0")
    np.testing.assert_array_equal(image, _arrays()[0])
    np.testing.assert_array_equal(label, _arrays()[1])
    assert store.read_case("t0")[1] is None
    assert store.case_meta("c0").shape == SHAPE
    assert store.case_sources("c1")[-1] == "labelsTr/c1.nii.gz" and len(store.case_sources("t0")) == 2
    locations = store.class_locations("c0")
    assert locations[1].shape == (0, 3) and locations[2].shape == (5, 3)
    assert all(label[tuple(v)] == 2 for v in locations[2])


@pytest.mark.parametrize(
    ("start", "size"),
    [((0, 0, 0), (6, 8, 10)), ((1, 2, 3), (2, 3, 4)), ((-2, 5, 7), (4, 4, 4)), ((4, -3, -1), (5, 5, 13)),
     ((10, 0, 0), (2, 2, 2))],
)
def test_read_patch_equals_padded_slice(store_uri: str, start: tuple, size: tuple) -> None:
    image, label = _arrays()
    pad = [(8, 8)] * 3
    padded_image = np.pad(image, [(0, 0), *pad])
    padded_label = np.pad(label, pad)
    window = tuple(slice(s + 8, s + 8 + n) for s, n in zip(start, size))
    got_image, got_label = TaskStore.open(store_uri).read_patch("c0", start, size)
    np.testing.assert_array_equal(got_image, padded_image[(slice(None), *window)])
    np.testing.assert_array_equal(got_label, padded_label[window])


def test_random_windows_equal_padded_slices(store_uri: str) -> None:
    store, rng = TaskStore.open(store_uri), np.random.default_rng(3)
    image, label = _arrays()
    padded_image, padded_label = np.pad(image, [(0, 0), *[(12, 12)] * 3]), np.pad(label, [(12, 12)] * 3)
    for _ in range(200):
        size = tuple(int(v) for v in rng.integers(1, 12, size=3))
        start = tuple(int(rng.integers(-n - 1, d + 1)) for n, d in zip(size, SHAPE))
        window = tuple(slice(s + 12, s + 12 + n) for s, n in zip(start, size))
        got_image, got_label = store.read_patch("c1", start, size)
        np.testing.assert_array_equal(got_image, padded_image[(slice(None), *window)])
        np.testing.assert_array_equal(got_label, padded_label[window])
    assert store.read_patch("t0", (0, 0, 0), (2, 2, 2))[1] is None and store.class_locations("t0") == {}


def test_other_zarr_layouts_are_read_through_zarr(store_uri: str, tmp_path: Path) -> None:
    uri = str(tmp_path / "plain.zarr")
    shutil.copytree(store_uri, uri)
    case = zarr.open_group(uri, mode="a")["cases/c0"]
    image, label = _arrays()
    case.create_array("image", data=image, chunks=(1, 3, 3, 3), overwrite=True)  # plain chunks, zstd
    case.create_array("label", data=label, chunks=(5, 5, 5), overwrite=True)
    store = TaskStore.open(uri)
    assert isinstance(store._case("c0").image, store_read.ZarrReader)
    assert isinstance(store._case("c1").image, store_read.ShardReader)
    for start, size in [((0, 0, 0), SHAPE), ((-1, 3, 5), (4, 4, 7))]:
        for got, want in zip(store.read_patch("c0", start, size), store.read_patch("c1", start, size)):
            np.testing.assert_array_equal(got, want)


def test_damaged_shard_index_is_refused(store_uri: str, tmp_path: Path) -> None:
    uri = str(tmp_path / "damaged.zarr")
    shutil.copytree(store_uri, uri)
    shard = Path(uri, "cases/c0/label/c/0/0/0")
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF  # inside the index, which comes first
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="case 'c0', array 'label': damaged shard index of cases/c0/label/c/0/0/0"):
        TaskStore.open(uri).read_patch("c0", (0, 0, 0), (2, 2, 2))


def test_all_background_label_has_no_shard_and_reads_as_zeros(tmp_path: Path) -> None:
    uri = str(tmp_path / "empty.zarr")
    root = writer.open_store(uri, None, overwrite=False)
    image, label = _arrays()
    locations = case.class_locations(np.zeros_like(label), 3, 5, np.random.default_rng(0))
    for case_id in ("c0", "c1"):
        writer.write_case(uri, None, case_id, (image, np.zeros_like(label)), {}, (4, 4, 4), class_locations=locations)
    writer.write_case(uri, None, "t0", (image, None), {}, (4, 4, 4))
    writer.write_manifest(root, _manifest())
    assert not Path(uri, "cases/c0/label/c").exists()
    store = TaskStore.open(uri)
    got_image, got_label = store.read_patch("c0", (-1, 2, 3), (4, 5, 6))
    assert got_label.shape == (4, 5, 6) and not got_label.any() and got_image[:, 1:].all()
    assert {c: v.shape for c, v in store.class_locations("c0").items()} == {1: (0, 3), 2: (0, 3)}
    image, label, _ = store.sample_patch(np.random.default_rng(0), (4, 4, 4), force_foreground=True)
    assert image.shape == (2, 4, 4, 4) and not label.any()


def test_sample_patch_forced_foreground_always_holds_it(store_uri: str) -> None:
    store = TaskStore.open(store_uri)
    rng = np.random.default_rng(0)
    for _ in range(20):
        image, label, case_id = store.sample_patch(rng, (4, 4, 4), force_foreground=True)
        assert case_id == "c0" and image.shape == (2, 4, 4, 4) and (label == 2).any()


def test_sample_patch_uniform_and_larger_than_volume(store_uri: str) -> None:
    store = TaskStore.open(store_uri)
    rng = np.random.default_rng(1)
    seen = {int(store.sample_patch(rng, (2, 2, 2), False, "c1")[1].any()) for _ in range(50)}
    assert seen == {0, 1}
    image, label, _ = store.sample_patch(rng, (8, 12, 12), True, "c1")
    assert image.shape == (2, 8, 12, 12) and (label == 2).sum() == 8 and (image[0] > 0).sum() == np.prod(SHAPE)


def test_pickled_store_reopens(store_uri: str) -> None:
    store = pickle.loads(pickle.dumps(TaskStore.open(store_uri)))
    np.testing.assert_array_equal(store.read_patch("c1", (0, 0, 0), (2, 2, 2))[1], np.zeros((2, 2, 2)))


def test_open_errors(store_uri: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="absent.zarr: not a Zarr group"):
        TaskStore.open(str(tmp_path / "absent.zarr"))
    unfinished = str(tmp_path / "unfinished.zarr")
    writer.open_store(unfinished, None, overwrite=False)
    with pytest.raises(StoreError, match="unfinished.zarr: no manifest"):
        TaskStore.open(unfinished)
    newer = str(tmp_path / "newer.zarr")
    writer.write_manifest(writer.open_store(newer, None, False), _manifest(format_version=FORMAT_VERSION + 1))
    with pytest.raises(StoreError, match=f"format version {FORMAT_VERSION + 1} .manifest.* is not supported"):
        TaskStore.open(newer)
    older = str(tmp_path / "older.zarr")
    writer.write_manifest(writer.open_store(older, None, False), _manifest(format_version=2))
    with pytest.raises(StoreError, match="format version 2 .manifest format_version. is not supported .*--overwrite"):
        TaskStore.open(older)
    with pytest.raises(StoreError, match="no case 'nope'"):
        TaskStore.open(store_uri).read_case("nope")


def test_incomplete_case_is_refused(store_uri: str, tmp_path: Path) -> None:
    uri = str(tmp_path / "partial.zarr")
    root = writer.open_store(uri, None, overwrite=False)
    root["cases"].create_group("c0", attributes={"complete": False})
    writer.write_manifest(root, _manifest())
    with pytest.raises(StoreError, match="case 'c0' is incomplete"):
        TaskStore.open(uri).read_case("c0")


def _copy(store_uri: str, tmp_path: Path, name: str) -> str:
    uri = str(tmp_path / name)
    shutil.copytree(store_uri, uri)
    return uri


def test_root_format_version_is_checked_too(store_uri: str, tmp_path: Path) -> None:
    """A store whose root says another version is refused by readers and by ingest, with the hint."""
    uri = _copy(store_uri, tmp_path, "root99.zarr")
    zarr.open_group(uri, mode="a").attrs["format_version"] = 99
    with pytest.raises(StoreError, match="root99.zarr: store format version 99 .root attribute.*--overwrite"):
        TaskStore.open(uri)
    with pytest.raises(StoreError, match="format version 99 .root attribute.*re-ingest it"):
        writer.open_store(uri, None, overwrite=False)


def test_every_chunk_carries_a_crc32c(store_uri: str) -> None:
    case = zarr.open_group(store_uri, mode="r")["cases/c0"]
    for name in ("image", "label", "class_locations"):
        codecs = case[name].metadata.codecs
        inner = codecs[0].codecs if len(codecs) == 1 else codecs
        assert type(inner[-1]).__name__ == "Crc32cCodec", name


def _flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << (position % 8)
    path.write_bytes(bytes(data))


def test_any_single_bit_flip_in_a_shard_is_an_error_naming_store_case_and_array(store_uri: str,
                                                                                 tmp_path: Path) -> None:
    """Before per-chunk checksums, flips in chunk bytes read back silently wrong or as a bare
    blosc error. Now every flipped byte of the image shard fails both readers, naming the array."""
    shard = Path(store_uri, "cases/c1/image/c/0/0/0/0")
    for position in range(0, shard.stat().st_size, max(1, shard.stat().st_size // 30)):
        uri = _copy(store_uri, tmp_path, f"flip{position}.zarr")
        _flip(Path(uri, "cases/c1/image/c/0/0/0/0"), position)
        with pytest.raises(StoreError, match=f"flip{position}.zarr: case 'c1', array 'image': .*(CRC32C|checksum)"):
            TaskStore.open(uri).read_case("c1")
        with pytest.raises(ValueError, match="checksum"):  # zarr-python's own read sees it too
            zarr.open_group(uri, mode="r")["cases/c1/image"][...]
        shutil.rmtree(uri)


def test_corrupt_class_locations_and_zarr_read_arrays_name_the_array(store_uri: str, tmp_path: Path) -> None:
    uri = _copy(store_uri, tmp_path, "locations.zarr")
    _flip(Path(uri, "cases/c0/class_locations/c/0/0"), 20)
    with pytest.raises(StoreError, match="locations.zarr: case 'c0', array 'class_locations': cannot read"):
        TaskStore.open(uri).class_locations("c0")


def test_verify_lists_each_corrupt_array(store_uri: str, tmp_path: Path) -> None:
    assert TaskStore.open(store_uri).verify() == []
    uri = _copy(store_uri, tmp_path, "verify.zarr")
    _flip(Path(uri, "cases/c0/image/c/0/0/0/0"), 200)
    _flip(Path(uri, "cases/c1/label/c/0/0/0"), 3)  # in the shard index
    _flip(Path(uri, "cases/t0/image/c/0/0/0/0"), 250)
    problems = TaskStore.open(uri).verify()
    assert len(problems) == 3, problems
    assert [p.split(",")[0] for p in problems] == [f"{uri}: case '{c}'" for c in ("c0", "c1", "t0")]
    assert "array 'label': damaged shard index" in problems[1]


def test_incomplete_store_warns_or_is_refused(store_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = _copy(store_uri, tmp_path, "incomplete.zarr")
    root = zarr.open_group(uri, mode="a")
    writer.write_manifest(root, _manifest(failed={"c9": ["x/c9.nii.gz: missing label"]}, stale={"c1": "gone"}))
    store = TaskStore.open(uri)
    assert store.manifest.failed == {"c9": ["x/c9.nii.gz: missing label"]} and store.manifest.stale == {"c1": "gone"}
    assert "its last ingest did not finish cleanly: 1 failed case(s) (c9), 1 stale case(s) (c1)" in caplog.text
    with pytest.raises(StoreError, match="did not finish cleanly.*data.allow_incomplete_stores"):
        TaskStore.open(uri, allow_incomplete=False)
    caplog.clear()
    TaskStore.open(store_uri, allow_incomplete=False)
    assert "did not finish" not in caplog.text


def test_a_missing_shard_is_an_error_unless_the_array_was_written_empty(store_uri: str, tmp_path: Path) -> None:
    """zarr-python reads a deleted shard as fill values; the store records which arrays are empty."""
    uri = _copy(store_uri, tmp_path, "missing.zarr")
    Path(uri, "cases/c1/image/c/0/0/0/0").unlink()
    assert zarr.open_group(uri, mode="r")["cases/c1/image"][...].max() == 0  # silently zeros
    with pytest.raises(StoreError, match="missing.zarr: case 'c1', array 'image': shard cases/c1/image/c/0/0/0/0 "
                                         "is missing"):
        TaskStore.open(uri).read_patch("c1", (0, 0, 0), (2, 2, 2))
    assert len(TaskStore.open(uri).verify()) == 1
    assert zarr.open_group(store_uri, mode="r")["cases/c0"].attrs["empty_arrays"] == []
