"""The executed copies in notebooks/executed/ (pictures without running) match the lessons they show.

They are refreshed with ``python notebooks/execute.py --small --out notebooks/executed``; this test fails
when a lesson's cells changed and its executed copy was not refreshed, so the copies cannot go stale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
LESSONS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def _cells(notebook: dict) -> list[tuple[str, str]]:
    """(type, source) of each cell, without the cell papermill injects for the parameters."""
    return [(c["cell_type"], "".join(c["source"])) for c in notebook["cells"]
            if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_executed_copy_is_current_small_and_ran_cleanly(lesson):
    copy = NOTEBOOKS / "executed" / lesson.name
    refresh = "refresh it: python notebooks/execute.py --small --out notebooks/executed"
    assert copy.is_file(), f"no executed copy of {lesson.name}; {refresh}"
    executed = json.loads(copy.read_text())
    assert _cells(executed) == _cells(json.loads(lesson.read_text())), f"{copy} is stale; {refresh}"
    assert copy.stat().st_size <= 2 * 2**20
    outputs = [o for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert outputs and not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) or "image/jpeg" in o.get("data", {}) for o in outputs)


def test_the_check_sees_a_changed_cell():
    lesson = json.loads(LESSONS[0].read_text())
    changed = json.loads(LESSONS[0].read_text())
    changed["cells"][-1]["source"] = ["# edited\n"]
    assert _cells(lesson) != _cells(changed)


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(lesson):
    """``papermill --help-notebook`` and papermill's checks of ``-p`` read the parameters cell line by
    line; a line it cannot parse (e.g. ``<=`` in a comment) drops that parameter with a warning."""
    import ast

    from papermill.translators import PythonTranslator

    cell = next(c for c in json.loads(lesson.read_text())["cells"]
                if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "".join(cell["source"])
    assigned = [node.targets[0].id for node in ast.parse(source).body if isinstance(node, ast.Assign)]
    assert [p.name for p in PythonTranslator.inspect({"source": source})] == assigned
