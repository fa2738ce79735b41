"""Importing a UniSeg reference-code checkpoint: our network computes what the reference computes.

The fixtures in tests/fixtures/reference were made with the reference's own code, run outside
this project (tests/fixtures/reference/make_fixture.py.txt; README "Coming from the UniSeg
reference code"): a reduced reference network with random weights saved by the reference
trainer's save_checkpoint, an input per channel count and the reference network's outputs for
every task id at every deep-supervision level, and the name and shape of every tensor of the
full-size reference network.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import ray
import torch
import yaml
from safetensors.torch import load_file

from model.presets import PRESETS
from model.reference_layout import ReferenceLayoutError, describe_reference, from_reference, reference_key_map
from model.transfer import transfer_to_single_task
from model.universal import MASKED_LOGIT
from pipeline.common.inference import InferenceOptions
from pipeline.common.mlflow_model import load_model
from pipeline.common.model_card import ModelCard, build_from_card, load_model_dir
from pipeline.datasets.synthetic import SyntheticTask, write_task
from pipeline.finetune.__main__ import main as finetune_main
from pipeline.import_reference.__main__ import main
from pipeline.import_reference.checkpoint import ReferenceCheckpointError, read_checkpoint
from pipeline.import_reference.facts import FactsError
from pipeline.import_reference.export import export
from pipeline.import_reference.export import main as export_main
from pipeline.import_reference.run import DEFAULT_FACTS, import_checkpoint
from pipeline.predict.io import PredictError
from pipeline.predict.run import PredictOptions
from pipeline.predict.run import run as predict
from test_restricted_pickle import _Payload as RunsCode  # pickles as os.system("touch MARKER")

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
SMALL = FIXTURES / "small" / "model_final_checkpoint.model"
CASES = json.loads((FIXTURES / "small" / "cases.json").read_text())["cases"]
TOLERANCE = 1e-4  # max abs difference, fp32


@pytest.fixture(scope="module")
def imported() -> tuple[torch.nn.Module, object]:
    network, card, _ = import_checkpoint(SMALL)
    return network, card


@pytest.fixture(scope="module")
def reference_io() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "small" / "io.safetensors"))


@pytest.mark.parametrize("case", CASES, ids=[f"task{c['task_id']}-{c['input']}" for c in CASES])
def test_imported_network_gives_the_reference_outputs(imported, reference_io, case) -> None:
    network, card = imported
    x = reference_io[case["input"]]
    assert x.shape[1] == card.tasks[case["task_id"]].in_channels
    with torch.no_grad():
        ours = network(x, [case["task_id"]] * x.shape[0])
    assert len(ours) == case["levels"]  # every deep-supervision level, highest resolution first
    classes = case["task_classes"]
    for level, out in enumerate(ours):
        expected = reference_io[f"case{case['case']}_level{level}"]
        assert out[:, :classes].shape == expected.shape
        assert (out[:, :classes] - expected).abs().max().item() < TOLERANCE, f"level {level}"
        assert torch.all(out[:, classes:] == MASKED_LOGIT)  # the reference crops these; ours masks them


def test_every_task_id_and_channel_count_is_covered() -> None:
    assert sorted({c["task_id"] for c in CASES}) == list(range(11))
    assert {c["input"] for c in CASES} >= {"input_1ch", "input_2ch", "input_4ch", "input_1ch_batch2"}


def test_a_wrong_mapping_would_be_caught(imported, reference_io) -> None:
    """The fixture is sensitive: a head left at zero, or the prompt's tasks shifted by one, gives
    outputs far outside the tolerance."""
    network, _ = imported
    state = network.state_dict()
    case = CASES[0]
    x = reference_io[case["input"]]
    for wrong in ("heads", "prompt"):
        changed = {k: v.clone() for k, v in state.items()}
        if wrong == "heads":
            changed["heads.convs.0.weight"] = torch.zeros_like(changed["heads.convs.0.weight"])
        else:
            changed["prompt"] = changed["prompt"].roll(1, dims=1)
        copy = build_from_card(imported[1])
        copy.load_state_dict(changed)
        with torch.no_grad():
            out = copy.eval()(x, [case["task_id"]])[0][:, : case["task_classes"]]
        assert (out - reference_io[f"case{case['case']}_level0"]).abs().max().item() > 1e-2, wrong


def _paper_plans() -> dict:
    keys = json.loads((FIXTURES / "uniseg_paper_keys.json").read_text())
    stage = {"batch_size": 2, "num_pool_per_axis": [4, 5, 5], "patch_size": np.array(keys["patch_size"]),
             "current_spacing": np.array([3.0, 1.5, 1.5]), "original_spacing": np.array([3.0, 1.5, 1.5]),
             "do_dummy_2D_data_aug": False, "pool_op_kernel_sizes": keys["pool_op_kernel_sizes"],
             "conv_kernel_sizes": keys["conv_kernel_sizes"]}
    return {"num_classes": 3, "normalization_schemes": None, "modalities": {0: ["CT", "T1", "T2"]},
            "dataset_properties": {"intensityproperties": None}, "preprocessor_name": "DoDNetPreprocessor",
            "conv_per_stage": 2, "plans_per_stage": {0: stage}}


def _write_reference_checkpoint(path: Path, state: dict, plans: dict) -> Path:
    torch.save({"epoch": 1000, "state_dict": OrderedDict(state), "optimizer_state_dict": None,
                "plot_stuff": ([np.float64(0.5)], [], [], []), "amp_grad_scaler": {"scale": 65536.0}}, path)
    info = OrderedDict(init=("plans.pkl", 0), name="UniSeg_Trainer", plans=plans)
    path.with_name(path.name + ".pkl").write_bytes(pickle.dumps(info))
    return path


def test_full_size_reference_layout_maps_every_tensor(tmp_path: Path) -> None:
    """The reference network at the paper's topology, as recorded from its code: every tensor has
    a place in ours, none is left over, the strict load passes and the spec is our preset's."""
    recorded = json.loads((FIXTURES / "uniseg_paper_keys.json").read_text())
    shapes = {k: tuple(v) for k, v in recorded["state_dict"].items()}
    described = describe_reference(shapes, recorded["patch_size"])
    assert described.spec == PRESETS["uniseg-paper"]
    assert (described.num_tasks, described.max_classes, described.stems) == (11, 4, (1, 2, 4))
    assert set(reference_key_map(6)) == set(shapes)
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    path = _write_reference_checkpoint(tmp_path / "model_final_checkpoint.model", state, _paper_plans())
    network, card, facts = import_checkpoint(path)  # strict=True inside
    assert sum(p.numel() for p in network.parameters()) == recorded["parameters"] == 32_114_381
    assert [t.name for t in card.tasks][7] == "vertebrae" and card.tasks[10].modalities == ("CT", "PET")
    assert card.tasks[9].in_channels == 4 and card.tasks[9].num_classes == 4
    assert card.tasks[0].normalization[0] == {"scheme": "ct-window", "lower": -325.0, "upper": 325.0,
                                              "mean": None, "std": None}
    sources = {f.key: f.source for f in facts}
    assert sources["patch_size"] == "plans" and sources["tasks.7.target_spacing"] == str(DEFAULT_FACTS)


def test_left_over_and_missing_tensors_are_named() -> None:
    recorded = json.loads((FIXTURES / "uniseg_paper_keys.json").read_text())
    state = {k: torch.zeros(1) for k in recorded["state_dict"]}
    spec = PRESETS["uniseg-paper"]
    del state["seg_outputs.3.weight"]
    state["conv_blocks_context.6.blocks.0.conv.weight"] = torch.zeros(1)
    with pytest.raises(ReferenceLayoutError, match=r"missing seg_outputs\.3\.weight; left over conv_blocks_context\.6"):
        from_reference(state, spec)
    with pytest.raises(ReferenceLayoutError, match="decoder_kernels 'nnunet-v2'"):
        from_reference(state, PRESETS["tiny"].replace(decoder_kernels="nnunet-v2"))


def test_a_state_dict_that_is_not_the_references_is_named() -> None:
    with pytest.raises(ReferenceLayoutError, match=r"no tu\.\* upsampling tensors"):
        describe_reference({"encoder.stems.1.weight": (2, 1, 1, 3, 3)}, (32, 64, 64))
    recorded = json.loads((FIXTURES / "uniseg_paper_keys.json").read_text())["state_dict"]
    with pytest.raises(ReferenceLayoutError, match="no 'intermedia_prompt'"):
        describe_reference({k: v for k, v in recorded.items() if k != "intermedia_prompt"}, (64, 192, 192))


def test_data_parallel_prefix_is_dropped() -> None:
    recorded = json.loads((FIXTURES / "uniseg_paper_keys.json").read_text())
    state = {f"module.{k}": torch.zeros(1) for k in recorded["state_dict"]}
    assert set(from_reference(state, PRESETS["uniseg-paper"])) == set(reference_key_map(6).values())


def _rewrite_pickle(model: Path, out: Path, old: bytes, new: bytes) -> Path:
    """A copy of the torch file `model` whose pickled object names `new` where it named `old`."""
    with zipfile.ZipFile(model) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                assert old in data
                data = data.replace(old, new)
            dst.writestr(item, data)
    out.with_name(out.name + ".pkl").write_bytes(model.with_name(model.name + ".pkl").read_bytes())
    return out


def test_a_checkpoint_written_under_numpy_1_loads(tmp_path: Path) -> None:
    """The released model was saved with numpy 1, whose scalars pickle as numpy.core.multiarray.scalar."""
    path = _rewrite_pickle(SMALL, tmp_path / "m.model", b"numpy._core.multiarray", b"numpy.core.multiarray")
    loaded = read_checkpoint(path)
    assert set(loaded.state_dict) == set(read_checkpoint(SMALL).state_dict)
    assert "plot_stuff" in loaded.other_entries


def test_a_checkpoint_that_asks_for_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.model"
    torch.save({"state_dict": {}, "x": RunsCode(marker)}, path)
    path.with_name("evil.model.pkl").write_bytes(pickle.dumps({"plans": {"plans_per_stage": {0: {}}}}))
    with pytest.raises(ReferenceCheckpointError, match=r"evil\.model: refused to load posix\.system \("):
        read_checkpoint(path)
    assert main([str(path), "-o", str(tmp_path / "out")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_plans_pickle_that_asks_for_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "m.model"
    path.write_bytes(SMALL.read_bytes())
    path.with_name("m.model.pkl").write_bytes(pickle.dumps({"plans": RunsCode(marker)}))
    assert main([str(path), "-o", str(tmp_path / "out")]) == 2
    assert not marker.exists()


def test_cli_writes_a_model_folder_that_loads(tmp_path: Path, reference_io) -> None:
    assert main([str(SMALL), "-o", str(tmp_path / "model")]) == 0
    network, card = load_model_dir(tmp_path / "model")
    case = CASES[9]
    with torch.no_grad():
        out = network(reference_io[case["input"]], case["task_id"])[0]
    assert (out - reference_io[f"case{case['case']}_level0"]).abs().max().item() < TOLERANCE
    assert card.metadata["source"].startswith("UniSeg reference") and card.metadata["epochs_trained"] == 2
    assert card.metadata["facts"]["patch_size"] == "plans"


def _facts(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "facts.yaml"
    path.write_text(text)
    return path


def test_facts_that_do_not_fit_the_checkpoint_are_named(tmp_path: Path) -> None:
    lines = DEFAULT_FACTS.read_text()
    ten = _facts(tmp_path, lines.replace("  - {name: colon, reference_name: colo", "  - {name: colon, x: 1"))
    with pytest.raises(FactsError, match=r"facts\.yaml: tasks\.4\.x: Extra inputs"):
        import_checkpoint(SMALL, ten)
    three = _facts(tmp_path, lines.replace("modalities: [MR, MR, MR, MR]", "modalities: [MR, MR, MR]"))
    with pytest.raises(FactsError, match=r"tasks\.9\.modalities: 3 channel\(s\), but the checkpoint has first "
                                         r"convolutions for 1, 2, 4 channel\(s\) only"):
        import_checkpoint(SMALL, three)
    short = "\n".join(line for line in lines.splitlines() if "autopet" not in line and "lesion" not in line)
    with pytest.raises(FactsError, match="10 given, but the checkpoint's prompt has 11"):
        import_checkpoint(SMALL, _facts(tmp_path, short))
    assert main([str(SMALL), "-o", str(tmp_path / "o"), "--facts", str(tmp_path / "facts.yaml")]) == 2


def test_a_first_convolution_no_task_takes_is_dropped_and_said(tmp_path: Path, caplog) -> None:
    """The reference's trainer builds first convs for 1, 2 and 4 channels whatever its tasks; a model
    trained on 1-channel tasks only imports without the two it never trained."""
    lines = DEFAULT_FACTS.read_text()
    one_channel = _facts(tmp_path, lines.replace("modalities: [MR, MR, MR, MR]", "modalities: [MR]").replace(
        "modalities: [CT, PET]", "modalities: [PET]"))
    network, card, _ = import_checkpoint(SMALL, one_channel)
    assert card.metadata["dropped"] == [f"conv_blocks_context.0.blocks.0.conv_{c}.{p}" for c in (2, 4)
                                        for p in ("bias", "weight")]
    assert "no task in" in caplog.text and "takes 2, 4 channel(s)" in caplog.text
    assert set(network.encoder.stems) == {"1"}


def test_facts_come_from_plans_where_the_plans_hold_them(tmp_path: Path) -> None:
    """Spacing left out of the YAML comes from the plans; a CT channel that the plans normalise with
    nnU-Net v1's GenericPreprocessor takes its clipping and z-score values from the plans."""
    ref = read_checkpoint(SMALL)
    plans = dict(ref.plans, normalization_schemes=OrderedDict({0: "CT"}), modalities={0: "CT"},
                 preprocessor_name="GenericPreprocessor",
                 dataset_properties={"intensityproperties": OrderedDict({0: {
                     "mean": np.float64(99.0), "sd": np.float64(40.0), "percentile_00_5": -900.0,
                     "percentile_99_5": 1200.0}})})
    path = _write_reference_checkpoint(tmp_path / "m.model", ref.state_dict, plans)
    facts = _facts(tmp_path, DEFAULT_FACTS.read_text().replace(
        "{name: liver, reference_name: live, modalities: [CT], target_spacing: [3.0, 1.5, 1.5],",
        "{name: liver, reference_name: live, modalities: [CT],"))
    _, card, found = import_checkpoint(path, facts)
    assert card.tasks[0].target_spacing == (3.0, 1.5, 1.5)
    assert card.tasks[0].normalization[0] == {"scheme": "ct-clip-zscore", "lower": -900.0, "upper": 1200.0,
                                              "mean": 99.0, "std": 40.0}
    assert card.tasks[8].normalization[0]["scheme"] == "zscore"  # MR: the plans' channel 0 is CT, not MR
    sources = {f.key: f.source for f in found}
    assert sources["tasks.0.target_spacing"] == sources["tasks.0.normalization.0"] == "plans"
    assert sources["tasks.1.target_spacing"] == sources["tasks.8.normalization.0"] == str(facts)


def test_registered_import_predicts_with_reference_task_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference_io) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main([str(SMALL), "-o", str(tmp_path / "model"), "--register", "uniseg-reference", "--alias", "upstream",
                 "--tracking-uri", uri]) == 0
    mlflow.set_tracking_uri(uri)
    network, card = load_model("models:/uniseg-reference@upstream")
    assert [t.name for t in card.tasks][9] == "brats"
    case = CASES[10]
    with torch.no_grad():
        out = network(reference_io[case["input"]], case["task_id"])[2][:, : case["task_classes"]]
    assert (out - reference_io[f"case{case['case']}_level2"]).abs().max().item() < TOLERANCE
    facts = mlflow.artifacts.load_text(f"{mlflow.search_runs(experiment_names=['uniseg']).artifact_uri[0]}"
                                       "/import/facts.txt")
    assert "patch_size = [32, 64, 64]  [plans]" in facts

    # predict from the registry with the reference's task ids (`-task_id 7`, `-task_id -1 -modality CT`)
    scan = tmp_path / "scan_0000.nii.gz"
    image = np.random.default_rng(0).normal(0.0, 300.0, (40, 36, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 3.0, 1.0])), scan)
    options = dict(model="models:/uniseg-reference@upstream", input=scan, inference=InferenceOptions(mirror_axes=()),
                   tracking_uri=uri)
    predict(PredictOptions(task="7", output=tmp_path / "by_id", **options))
    predict(PredictOptions(task="vertebrae", output=tmp_path / "by_name", **options))
    by_id = nib.load(tmp_path / "by_id" / "scan_0000.nii.gz")
    assert by_id.shape == image.shape and np.allclose(by_id.affine, np.diag([1.5, 1.5, 3.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(by_id.dataobj),
                                  np.asarray(nib.load(tmp_path / "by_name" / "scan_0000.nii.gz").dataobj))
    assert json.loads((tmp_path / "by_id" / "scan_0000.json").read_text())["tasks"] == ["vertebrae"]
    predict(PredictOptions(task="all", modalities=("CT",), output=tmp_path / "all", **options))
    sidecar = json.loads((tmp_path / "all" / "scan_0000.json").read_text())
    assert sidecar["tasks"] == ["liver", "kidney", "hepatic_vessel", "pancreas", "colon", "lung", "spleen", "vertebrae"]
    # the reference's merged label ids for its CT tasks (predict.py's couple_id) are the same numbers
    assert [sidecar["labels"][str(i)] for i in (1, 2, 3, 9, 11, 12)] == [
        "liver/liver", "liver/liver_tumor", "kidney/kidney", "colon/colon_tumor", "spleen/spleen", "vertebrae/vertebrae"]
    with pytest.raises(PredictError, match="--task 11: unknown task id; this model knows 0=liver"):
        predict(PredictOptions(task="11", output=tmp_path / "none", **options))


def test_imported_model_transfers_to_a_new_task(imported) -> None:
    """The reference's downstream recipe on the imported weights: encoder-decoder loaded, the first
    upsampling adapted (no prompt channel), heads re-initialised, prompt, FUSE and the other stems dropped."""
    network, card = imported
    target, report = transfer_to_single_task(network.state_dict(), card.spec, in_channels=1, num_classes=3)
    assert report.adapted == ("decoder.upsample.0.weight",)
    assert set(report.reinitialised) == {n for n in target.state_dict() if n.startswith("heads.")}
    assert {"prompt", "fuse.0.conv.weight", "encoder.stems.2.weight", "encoder.stems.4.weight"} <= set(report.dropped)
    assert torch.equal(target.state_dict()["encoder.stems.1.weight"], network.state_dict()["encoder.stems.1.weight"])


@pytest.mark.slow
def test_finetune_from_the_imported_model(tmp_path: Path) -> None:
    """`pipeline.finetune --pretrained MODEL_DIR` on a new task, from the imported reference model."""
    new = SyntheticTask("Task05_RefSpleen", ("CT",), ("background", "spleen"), spacing=(1.5, 1.5, 3.0),
                        shape=(32, 32, 16), num_cases=4)
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pipeline.ingest", "--out", str(tmp_path / "stores"), "--num-workers", "1",
                    "--source", str(write_task(tmp_path / "raw", new))], check=True, capture_output=True, cwd=root)
    assert main([str(SMALL), "-o", str(tmp_path / "imported")]) == 0
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({
        "name": "recipe",
        "train": {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "validate_every": 1,
                  "checkpoint_every": 1, "loader_workers": 0, "precision": "fp32"},
        "ray": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": str(tmp_path / "ray")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "import-tests"}}))
    try:
        code = finetune_main(["--pretrained", str(tmp_path / "imported"), "--store",
                              str(tmp_path / "stores" / f"{new.name}.zarr"), "--config", str(config),
                              "--name", "spleen", "--register", "ref-spleen"])
    finally:
        ray.shutdown()  # the stage started a local Ray in this process; later modules start their own
    assert code == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tuned, card = load_model("models:/ref-spleen/1")
    assert card.spec.architecture == "plain" and card.spec.decoder_kernels == "nnunet-v1"
    assert [t.name for t in card.tasks] == [new.name] and card.metadata["pretrained"] == str(tmp_path / "imported")


def test_export_then_import_gives_the_same_network(imported, reference_io, tmp_path: Path) -> None:
    """import(export(model)): the same card tasks and spec, identical weights and outputs."""
    network, card = imported
    path = export(network, card, tmp_path / "exported")
    assert path.name == "model_final_checkpoint.model" and (tmp_path / "exported" / "facts.yaml").is_file()
    again, card_again, _ = import_checkpoint(path, tmp_path / "exported" / "facts.yaml")
    assert card_again.tasks == card.tasks and card_again.spec == card.spec
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in network.state_dict().items())
    for case in CASES:
        x = reference_io[case["input"]]
        with torch.no_grad():
            ours, back = network(x, case["task_id"]), again(x, case["task_id"])
        assert all(torch.equal(a, b) for a, b in zip(ours, back))


def test_export_of_the_paper_network_has_the_reference_layout(tmp_path: Path) -> None:
    """The uniseg-paper preset exports to exactly the reference network's tensor names and shapes,
    as recorded from its code, and imports back."""
    recorded = json.loads((FIXTURES / "uniseg_paper_keys.json").read_text())
    _, card, _ = import_checkpoint(_write_reference_checkpoint(
        tmp_path / "ref.model", {k: torch.zeros(s) for k, s in recorded["state_dict"].items()}, _paper_plans()))
    torch.manual_seed(0)
    network = build_from_card(card)
    path = export(network, card, tmp_path / "exported")
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert {k: list(v.shape) for k, v in saved.items()} == recorded["state_dict"]
    again, _, _ = import_checkpoint(path, tmp_path / "exported" / "facts.yaml")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in network.state_dict().items())


def test_export_refuses_what_the_reference_cannot_build(imported, tmp_path: Path) -> None:
    tiny = ModelCard(spec=PRESETS["tiny"], tasks=imported[1].tasks)
    with pytest.raises(ReferenceLayoutError, match="decoder_kernels 'nnunet-v2'"):
        export(build_from_card(tiny), tiny, tmp_path / "x")
    wide = replace(tiny, spec=PRESETS["tiny"].replace(decoder_kernels="nnunet-v1", features=(8, 16, 32, 64, 96)))
    with pytest.raises(ReferenceLayoutError, match=r"features \(8, 16, 32, 64, 96\): the reference doubles"):
        export(build_from_card(wide), wide, tmp_path / "x")
    assert export_main(["--model", str(tmp_path / "absent"), "-o", str(tmp_path / "x")]) == 2
