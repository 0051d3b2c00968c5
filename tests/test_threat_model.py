"""docs/THREAT_MODEL.md: every row names a test, and every named test exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "THREAT_MODEL.md"
REF = re.compile(r"(tests/[\w/]+\.py)::(test_\w+)")


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")}


def test_every_row_points_to_a_real_test():
    rows = [line for line in DOC.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| input") and "---" not in line]
    assert len(rows) > 40
    missing = []
    for row in rows:
        refs = REF.findall(row)
        assert refs, f"row without a test: {row}"
        for file, name in refs:
            path = ROOT / file
            if not path.exists() or name not in defined_tests(path):
                missing.append(f"{file}::{name}")
    assert not missing, f"tests named in THREAT_MODEL.md that do not exist: {missing}"
