"""Stages talk through stores and MLflow only: no stage imports another (CONTRIBUTING.md).

Exceptions (ALLOWED): `pipeline.tune` and `pipeline.finetune` wrap training (a search runs
trials of the train loop; fine-tuning is a training run from a pretrained model), so they may
import `pipeline.train`. Nothing may import them, and train imports neither.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(p.name for p in (ROOT / "pipeline").iterdir() if p.is_dir() and p.name not in {"common", "__pycache__"})


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules

ALLOWED = {("tune", "train"), ("finetune", "train")}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_no_other_stage(stage: str) -> None:
    others = {f"pipeline.{s}" for s in STAGES if s != stage and (stage, s) not in ALLOWED}
    for path in (ROOT / "pipeline" / stage).rglob("*.py"):
        bad = {m for m in _imported_modules(path) if any(m == o or m.startswith(o + ".") for o in others)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_model_and_common_import_no_stage() -> None:
    stages = {f"pipeline.{s}" for s in STAGES}
    for folder in (ROOT / "model", ROOT / "pipeline" / "common"):
        for path in folder.rglob("*.py"):
            bad = {m for m in _imported_modules(path) if any(m == s or m.startswith(s + ".") for s in stages)}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


SOURCE_FOLDERS = ("pipeline", "model", "cluster", "benchmarks")
MAX_LINES = 400
# MLflow lives in pipeline/common: runs (tracking.py), models (mlflow_model.py) and the pyfunc entry
# MLflow loads (pyfunc_model.py); everything else calls them.
MLFLOW_MODULES = {"pipeline/common/tracking.py", "pipeline/common/mlflow_model.py", "pipeline/common/pyfunc_model.py"}
# What tune and finetune may import from train: its entry points only (the run, the loop, store opening, the
# fine-tuning checks).
TRAIN_ENTRY_POINTS = {"pipeline.train.run", "pipeline.train.loop", "pipeline.train.build", "pipeline.train.finetune"}


def _sources() -> list[Path]:
    return sorted(p for folder in SOURCE_FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_no_module_over_max_lines() -> None:
    for path in _sources():
        name = str(path.relative_to(ROOT))
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{name}: {lines} lines (split it; at most {MAX_LINES})"


def test_mlflow_imported_by_known_modules_only() -> None:
    importing = {str(p.relative_to(ROOT)) for p in _sources()
                 if any(m == "mlflow" or m.startswith("mlflow.") for m in _imported_modules(p))}
    assert importing <= MLFLOW_MODULES, f"modules import mlflow (call pipeline/common's helpers): {sorted(importing - MLFLOW_MODULES)}"


@pytest.mark.parametrize("stage", ["tune", "finetune"])
def test_tune_and_finetune_use_train_entry_points_only(stage: str) -> None:
    for path in (ROOT / "pipeline" / stage).rglob("*.py"):
        train = {m for m in _imported_modules(path) if m == "pipeline.train" or m.startswith("pipeline.train.")}
        assert train <= TRAIN_ENTRY_POINTS, f"{path.relative_to(ROOT)} imports {sorted(train - TRAIN_ENTRY_POINTS)}"


DOCS = [ROOT / "CONTRIBUTING.md", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A repository path in backticks or a link: starts at a top-level folder or file of the repository.
PATH_IN_DOC = re.compile(r"(?<![\w/.-])((?:pipeline|model|cluster|benchmarks|configs|docs|tests)/[\w./-]*[\w/]"
                         r"|(?:CONTRIBUTING|README)\.md)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_named_in_docs_exist(doc: Path) -> None:
    missing = sorted({m for m in PATH_IN_DOC.findall(doc.read_text()) if not (ROOT / m.rstrip("/")).exists()})
    assert not missing, f"{doc.relative_to(ROOT)} names paths the repository does not hold: {missing}"


def test_contributing_exists() -> None:
    assert (ROOT / "CONTRIBUTING.md").is_file()


def test_no_citation_of_files_outside_the_repository() -> None:
    for path in sorted([*ROOT.glob("*.md"), *(p for f in (*SOURCE_FOLDERS, "docs", "tests", "configs")
                                              for p in (ROOT / f).rglob("*") if p.suffix in {".py", ".md"})]):
        text = path.read_text()
        cited = [name for name in ("STYLE" + ".md", "UNISEG" + ".md") if name in text]
        assert not cited, f"{path.relative_to(ROOT)} cites {cited}, which the repository does not hold"
