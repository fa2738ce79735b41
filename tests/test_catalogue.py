"""The bad-input catalogues of docs/architecture.md and their tests cannot drift apart.

Each catalogue row carries a short id (its first column). A test covers a row by naming that id:
`row="<id>"` in an entry of a parametrised catalogue (tests/test_bad_input_ingest.py,
tests/test_bad_input_predict.py) or `@pytest.mark.catalogue("<id>")` on a test function. Every
row must be covered, and every id a test names must be a row. The test files are read as Python
source (ast), not imported, so this check needs neither a model nor a store.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
CATALOGUES = ("### Bad-input catalogue: ingest", "### Bad-input catalogue: predict, evaluate, tune")


def catalogue_rows(text: str, heading: str) -> list[str]:
    """The ids (first column, in backticks) of the rows of the first table under `heading`."""
    lines = text.split("\n")
    start = lines.index(heading)
    table = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    header, _, *rows = table
    assert header.startswith("| id |"), f"{DOC}: {heading}: the first column must be 'id'"
    return [re.fullmatch(r"`([a-z0-9-]+)`", row.split("|")[1].strip()).group(1) for row in rows]


def covered_rows(source: str) -> set[str]:
    """Ids named by `row="..."` keywords and `pytest.mark.catalogue("...")` calls in `source`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        found |= {k.value.value for k in node.keywords if k.arg == "row" and isinstance(k.value, ast.Constant)}
        if getattr(node.func, "attr", "") == "catalogue":
            found |= {a.value for a in node.args if isinstance(a, ast.Constant)}
    return found


def test_catalogue_rows_have_unique_ids() -> None:
    ids = [i for heading in CATALOGUES for i in catalogue_rows(DOC.read_text(), heading)]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


def test_every_catalogue_row_is_covered_by_a_test_and_every_test_row_exists() -> None:
    rows = {i for heading in CATALOGUES for i in catalogue_rows(DOC.read_text(), heading)}
    named = set().union(*(covered_rows(p.read_text()) for p in (ROOT / "tests").glob("test_*.py")))
    assert rows <= named, f"rows without a test: {sorted(rows - named)}"
    assert named <= rows, f"tests name rows docs/architecture.md lacks: {sorted(named - rows)}"


def test_catalogue_parser_reads_ids() -> None:
    text = "### T\n\nintro\n\n| id | a |\n|---|---|\n| `x-1` | b |\n| `y` | c |\n\nafter\n"
    assert catalogue_rows(text, "### T") == ["x-1", "y"]
    assert covered_rows('Bad("n", row="x-1")\n@pytest.mark.catalogue("y")\ndef f(): pass\n') == {"x-1", "y"}
