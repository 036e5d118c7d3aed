"""The package's layers: each imports only from those below it; plotting lives in the lesson layer.

``_util``, ``_lazy`` < ``method`` < ``data`` < ``backbones`` < ``pipeline`` < ``lessons`` < the top (``hpkit``,
``hpkit.__main__``). Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hpkit"
RANK = {"_lazy": 0, "_util": 0, "method": 1, "data": 2, "backbones": 3, "pipeline": 4, "lessons": 5}
TOP = 6
PLOTTING = ("matplotlib", "ipywidgets", "IPython")


def _layer(module: str) -> tuple[str, int]:
    """('pipeline', 4) for 'hpkit.pipeline.train'; the top for 'hpkit' and 'hpkit.__main__'."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in RANK:
        return parts[1], RANK[parts[1]]
    return "top", TOP


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved."""
    own = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = own.split(".")[:-1] if path.name != "__init__.py" else own.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            if name in ("hpkit", *(f"hpkit.{layer}" for layer in RANK)):  # from hpkit.lessons import plots
                found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_sits_in_a_layer():
    stray = [p.relative_to(PACKAGE).as_posix() for p in _modules() if p.parent == PACKAGE
             and p.stem not in ("__init__", "__main__", "_util", "_lazy")]
    assert stray == [], f"modules outside the layers: {stray}"


def test_no_upward_imports():
    upward = []
    for path in _modules():
        own = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        layer, rank = _layer(own)
        for line, name in _imports(path):
            if not name.startswith("hpkit"):
                continue
            other, other_rank = _layer(name)
            if other_rank > rank or (other_rank == rank and other != layer):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({layer}) imports {name} ({other})")
    assert upward == [], "imports that run up or across the layers:\n" + "\n".join(upward)


def test_plotting_only_in_lessons():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
             for path in _modules() if _layer(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))[0] != "lessons"
             for line, name in _imports(path) if name.split(".")[0] in PLOTTING]
    assert found == [], "matplotlib / ipywidgets outside hpkit/lessons:\n" + "\n".join(found)


def test_checker_sees_an_upward_import(tmp_path):
    """The check itself can fail: a method module importing the pipeline is reported."""
    bad = PACKAGE / "method" / "_layer_probe_tmp.py"
    bad.write_text("from hpkit.pipeline.config import Config\nimport matplotlib\n")
    try:
        names = [name for _, name in _imports(bad)]
        assert "hpkit.pipeline.config" in names and "matplotlib" in names
        assert _layer("hpkit.method._layer_probe_tmp")[1] < _layer("hpkit.pipeline.config")[1]
    finally:
        bad.unlink()


def test_notebooks_import_only_the_public_api():
    """Lessons use ``hpkit`` and ``hpkit.lessons``: no ``hpkit.pipeline.x`` or ``hpkit.method.x`` in a cell."""
    import json
    import re

    deep = re.compile(r"\bhpkit\.(?!lessons\b)\w+\.|\bfrom hpkit\.(?!lessons\b)\w+|\bhpkit\.lessons\.\w+\.")
    found = []
    for path in sorted((PACKAGE.parent / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                found += [f"{path.name}: {line.strip()}" for line in "".join(cell["source"]).splitlines()
                          if deep.search(line)]
    assert found == [], "notebooks reaching into hpkit's internals:\n" + "\n".join(found)
    assert deep.search("from hpkit.pipeline.train import train") and not deep.search("from hpkit.lessons import x")
