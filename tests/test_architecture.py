"""The import structure of ``docs/architecture.md``: the layers hold (import-linter reads the
contract in pyproject.toml) and no import closes a cycle, lazy ones included (grimp counts
imports inside functions too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("ctrserve")
    closing_a_cycle = sorted(
        (importer, imported) for importer in graph.modules
        for imported in graph.find_modules_directly_imported_by(importer)
        if graph.chain_exists(importer=imported, imported=importer)
    )
    assert closing_a_cycle == []


def test_the_layers_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout
