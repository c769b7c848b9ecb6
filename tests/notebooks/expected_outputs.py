"""The expected outputs of the notebooks' `# NBVAL_CHECK_OUTPUT` cells.

nbval compares a checked cell's fresh output with the output stored in the notebook it runs, and only
when that stored cell has an execution count. The committed notebooks therefore carry those cells'
outputs (every other cell stays empty). After changing what a checked cell prints, regenerate them:

    python tests/notebooks/expected_outputs.py [NAME ...]      # default: every notebook

This runs each notebook with the ci preset (as the notebook tests do) in a temporary folder and copies
the checked cells' outputs, and their execution counts, into notebooks/<name>.ipynb. Nothing else in the
committed file changes.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

CHECK = "NBVAL_CHECK_OUTPUT"
NB_DIR = Path(__file__).resolve().parents[2] / "notebooks"


def is_checked(cell: dict) -> bool:
    """A code cell whose source has the `# NBVAL_CHECK_OUTPUT` marker line (nbval's rule)."""
    src = cell.get("source", "")
    src = "".join(src) if isinstance(src, list) else src
    return cell.get("cell_type") == "code" and any(
        line.strip().startswith("#") and line.strip().lstrip("#").strip() == CHECK for line in src.splitlines())


def checked_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if is_checked(c)]


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def copy_outputs(executed: dict, committed: dict) -> int:
    """Copy the checked cells' outputs and execution counts from an executed notebook into the committed
    one, matched by source. Returns how many cells were copied."""
    ran = {_source(c): c for c in checked_cells(executed)}
    n = 0
    for cell in checked_cells(committed):
        src = _source(cell)
        if src not in ran:
            raise RuntimeError(f"checked cell not found in the executed notebook:\n{src}")
        cell["outputs"] = ran[src]["outputs"]
        cell["execution_count"] = ran[src]["execution_count"]
        n += 1
    return n


def write_notebook(path: Path, nb: dict) -> None:
    """nbformat's own layout (indent 1, sorted keys), so a diff shows only the cells that changed."""
    path.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def main(names: list[str]) -> int:
    from fluxlab import notebook

    names = names or [p.stem for p in sorted(NB_DIR.glob("*.ipynb"))]
    with tempfile.TemporaryDirectory(prefix="fluxlab-expected-") as tmp:
        env = {"FLUXLAB_STORE": os.path.join(tmp, "store.db")}
        for name in names:
            path = NB_DIR / f"{name}.ipynb"
            committed = json.loads(path.read_text())
            if not checked_cells(committed):
                print(f"{name}: no {CHECK} cell", file=sys.stderr)
                return 1
            res = notebook.run(name, "ci", runs_dir=Path(tmp) / "runs", env=env)
            if not res.ok:
                print(f"{name}: the notebook failed ({res.error}); expected outputs left as they were",
                      file=sys.stderr)
                return 1
            n = copy_outputs(json.loads(Path(res.output).read_text()), committed)
            write_notebook(path, committed)
            print(f"{name}: {n} checked cell(s) updated")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
