"""Stages talk through stores and MLflow only: no stage imports another (CONTRIBUTING.md).

Exceptions (ALLOWED): `pipeline.tune` and `pipeline.finetune` wrap training (a search runs
trials of the train loop; fine-tuning is a training run from a pretrained model), so they may
import `pipeline.train`. Nothing may import them, and train imports neither.
"""

import ast
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
