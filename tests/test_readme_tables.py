"""The README tables are what their results files render, and no table of figures lacks a results file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import results
from benchmarks.tables import READMES, RENDERERS, ROOT, problems, rendered

RESULTS_FILE = "benchmarks/results/loader/results.json"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_readme_tables_match_their_results_files(readme: Path) -> None:
    assert problems(readme) == []


def _repo_with(tmp_path: Path, readme_text: str) -> Path:
    target = tmp_path / "benchmarks" / "results" / "loader"
    target.mkdir(parents=True)
    (target / "results.json").write_text((ROOT / RESULTS_FILE).read_text())
    readme = tmp_path / "README.md"
    readme.write_text(readme_text)
    return readme


def test_a_table_edited_by_hand_is_reported(tmp_path: Path) -> None:
    readme = _repo_with(tmp_path, f"# x\n\n<!-- results: {RESULTS_FILE} table=loader -->\n<!-- /results -->\n")
    readme.write_text(rendered(readme.read_text(), tmp_path))
    assert problems(readme, tmp_path) == []
    readme.write_text(readme.read_text().replace("6.27", "6.72"))
    (problem,) = problems(readme, tmp_path)
    assert f"README.md:3: table differs from {RESULTS_FILE}" in problem


def test_a_changed_results_file_is_reported(tmp_path: Path) -> None:
    readme = _repo_with(tmp_path, f"<!-- results: {RESULTS_FILE} table=loader -->\n<!-- /results -->\n")
    readme.write_text(rendered(readme.read_text(), tmp_path))
    path = tmp_path / RESULTS_FILE
    data = json.loads(path.read_text())
    data["rows"][0]["ours_over_nnunet"] = 2.5
    path.write_text(json.dumps(data))
    assert len(problems(readme, tmp_path)) == 1


def test_tables_of_figures_need_markers(tmp_path: Path) -> None:
    text = ("intro 0.5 in prose\n\n| a | b |\n|---|---:|\n| ours | 0.123 |\n\n"
            "<!-- no-figures -->\n| key | value |\n|---|---|\n| momentum | 0.99 |\n\n"
            "```\n| not | 1.5 |\n```\n\n| plain | words |\n|---|---|\n| a | `lr 1.0` |\n")
    readme = _repo_with(tmp_path, text)
    assert problems(readme, tmp_path) == [f"{readme}:3: a table of figures without a results marker"]


def test_unknown_renderer_and_missing_file_are_one_line_each(tmp_path: Path) -> None:
    readme = _repo_with(tmp_path, f"<!-- results: {RESULTS_FILE} table=nope -->\n<!-- /results -->\n"
                                  "<!-- results: benchmarks/results/none.json table=loader -->\n<!-- /results -->\n")
    first, second = problems(readme, tmp_path)
    assert "unknown table 'nope'" in first
    assert "none.json: not a readable results file" in second


def test_write_records_provenance(tmp_path: Path) -> None:
    run = results.start(seeds=[3])
    path = results.write(tmp_path / "r" / "results.json", run, {"rows": [1.5]})
    data = results.read(path)
    provenance = data["provenance"]
    assert data["rows"] == [1.5]
    assert provenance["seeds"] == [3]
    assert provenance["commit"] and isinstance(provenance["dirty"], bool)
    assert provenance["machine"]["cpus"] >= 1
    assert len(provenance["machine"]["load_average_before"]) == len(provenance["machine"]["load_average_after"]) == 3
    assert provenance["command"].startswith("python ")


def test_check_mode_exit_status(tmp_path: Path) -> None:
    readme = _repo_with(tmp_path, "| a |\n|---|\n| 0.5 |\n")
    done = subprocess.run([sys.executable, "-m", "benchmarks.tables", "--check", str(readme)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "a table of figures without a results marker" in done.stderr


def test_a_benchmark_writes_its_results_file(tmp_path: Path) -> None:
    out = tmp_path / "inference.json"
    subprocess.run([sys.executable, "-m", "benchmarks.inference", "--presets", "tiny", "--tta", "off",
                    "--implementations", "ours", "--tiny-scan", "16", "32", "32", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    data = results.read(out)
    assert data["provenance"]["command"].startswith("python -m benchmarks.inference --presets tiny")
    assert data["provenance"]["seeds"] == [0, 1]
    (row,) = data["rows"]
    assert row["preset"] == "tiny" and row["implementation"] == "ours" and row["voxels_per_cpu_s"] > 0
    table = RENDERERS["inference"](data)
    assert table.startswith("tiny: scan 16 x 32 x 32; device cpu, 1 thread(s)")
    assert f"| tiny | off | ours | {row['seconds']:.2f} | {row['cpu_seconds']:.2f} |" in table


def test_renderers_of_built_results() -> None:
    finetune = {"arms": {"from universal": {"dice_per_epoch": [0.5, 0.75], "seconds": 99.6},
                         "from scratch": {"dice_per_epoch": [0.25, 0.5], "seconds": 80.0}}}
    assert RENDERERS["finetune"](finetune).splitlines() == [
        "| arm | ep 1 | ep 2 | wall s |", "|---|---:|---:|---:|",
        "| from universal | 0.500 | 0.750 | 100 |", "| from scratch | 0.250 | 0.500 | 80 |"]
    step = {"preset": "tiny", "architecture": "uniseg", "patch": "32x64x64", "batch_size": 2, "device": "cpu",
            "loader_only_samples_per_s": {"0": 40.0, "1": 50.0}, "model_only_samples_per_s": 3.5,
            "full_step": [{"workers": 2, "samples_per_s": 5.0, "data_wait": 0.01, "scaling_efficiency": 0.75,
                           "peak_rss_mib": 1000.0, "peak_loader_rss_mib": 600.0}]}
    table = RENDERERS["train_step"](step)
    assert "loader alone 40.0 with 0 loader workers, 50.0 with 1 loader workers samples/s" in table
    assert table.endswith("| 2 | 5.0 | 2.5 | 1 % | 0.75 | 1000 | 600 |")
