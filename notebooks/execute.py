"""Execute the numbered notebooks with papermill, in order (later ones reuse what earlier ones cached).

Usage::

    python notebooks/execute.py                    # defaults; executed copies in notebooks/executed/
    python notebooks/execute.py --small            # CI: small parameters, quick
    python notebooks/execute.py --in-place         # refresh the outputs stored in the notebooks themselves
    python notebooks/execute.py 02 -p num_images 4 # one notebook, a parameter of your own

Each executed notebook is checked to stay under 2 MB. Prints a table of run times.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_BYTES = 2 * 2**20

#: Small parameters for CI (``--small``): papermill injects them after each notebook's parameters cell.
SMALL: dict[str, dict[str, object]] = {
    "00_quickstart": {"crf": False},
    "01_reference_pool": {"batch_size": 4, "pool_size": 64, "pool_sizes": "2,8,64"},
    "02_global_hidden_positives": {"batch_size": 4, "pool_size": 64, "num_anchors": 1},
    "03_local_hidden_positives": {"num_images": 4},
    "04_training": {"max_images": 8, "num_examples": 1, "official": False},
    "05_ablations": {"seeds": [0], "steps": 8, "num_train": 32, "image_size": 32, "max_images": 4,
                     "base_pool_size": 16, "pool_sizes": [8, 16], "taus": [0.6, 0.9], "cost_steps": 2,
                     "cost_image_size": 32},
}


def notebooks(selected: list[str]) -> list[Path]:
    """The numbered notebooks, or those whose name starts with one of ``selected``."""
    found = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    if selected:
        found = [nb for nb in found if any(nb.name.startswith(s) for s in selected)]
        if not found:
            raise SystemExit(f"no notebook in {HERE} starts with {' or '.join(selected)}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("select", nargs="*", help="notebook name prefixes (default: all)")
    parser.add_argument("--small", action="store_true", help="inject the small CI parameters")
    parser.add_argument("--out", type=Path, default=HERE / "executed", help="folder for the executed copies")
    parser.add_argument("--in-place", action="store_true", help="write the outputs into the notebooks themselves")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a parameter for every selected notebook (a Python literal or a string)")
    args = parser.parse_args(argv)
    import papermill

    extra = {}
    for name, raw in args.p:
        try:
            extra[name] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            extra[name] = raw
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for nb in notebooks(args.select):
        params = {**(SMALL.get(nb.stem, {}) if args.small else {}), **extra}
        target = nb if args.in_place else args.out / nb.name
        started = time.time()
        try:
            papermill.execute_notebook(str(nb), str(target), parameters=params, kernel_name="python3",
                                       cwd=str(HERE), progress_bar=False)
            status = "ok"
        except Exception as err:  # noqa: BLE001 - report every notebook, fail at the end
            status = f"FAILED: {type(err).__name__}"
            failed.append(nb.name)
        size = target.stat().st_size if target.exists() else 0
        if status == "ok" and size > MAX_BYTES:
            status = f"too big ({size / 2**20:.1f} MB > 2 MB)"
            failed.append(nb.name)
        rows.append((nb.name, time.time() - started, size, params, status))
        print(f"{nb.name}: {status} in {rows[-1][1]:.0f} s", flush=True)
    print("\n| notebook | seconds | size (kB) | parameters | status |\n|---|---|---|---|---|")
    for name, seconds, size, params, status in rows:
        print(f"| {name} | {seconds:.0f} | {size / 1024:.0f} | {params or 'defaults'} | {status} |")
    print(f"\ntotal {sum(r[1] for r in rows):.0f} s; executed copies in {HERE if args.in_place else args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
