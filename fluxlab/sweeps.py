"""Parameter grids over one notebook: `fluxlab notebook sweep NAME -p k=v1,v2`.

One output notebook and one status file per grid cell, each run in its own process (so each can be
pinned to one GPU with CUDA_VISIBLE_DEVICES). A failed cell never stops the others; a re-run skips
cells whose status says they succeeded, unless forced.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fluxlab.notebook import (check_parameters, error_of, execute, gpu_ids, load_preset, records_in, resolve,
                              utc_stamp)


@dataclass
class CellResult:
    key: str
    params: dict
    status: str  # "ok" | "failed" | "skipped"
    output: str
    error: str = ""
    seconds: float = 0.0
    gpu: str | None = None
    records: int = 0


def grid_cells(grid: dict[str, list]) -> list[dict]:
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def cell_key(params: dict, preset: str, swept=None) -> str:
    """A stable, readable file name for one grid cell: the swept keys' values (`swept`, in grid
    order; all parameters when None), then a short hash of the whole parameter set, so two sweeps
    over different fixed values never collide. Each value is cut to 40 characters, never a key."""
    text = json.dumps({"preset": preset, **params}, sort_keys=True, default=str)
    keys = list(swept) if swept is not None else sorted(params)
    parts = [re.sub(r"[^A-Za-z0-9._=-]+", "-", f"{k}={str(params[k])[:40]}").strip("-") for k in keys]
    return f"{'__'.join(parts) or 'defaults'}__{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def sweep(name: str | os.PathLike, preset: str = "full", grid: dict[str, list] | None = None, *,
          workers: int = 1, force: bool = False, runs_dir: str | os.PathLike = "runs",
          env: dict | None = None, timeout: float | None = None, on_cell=None) -> list[CellResult]:
    """Run every cell of `grid` (name -> list of values) as its own notebook run.

    Outputs are runs/<name>/sweep/<cell-key>.ipynb beside <cell-key>.json (the cell's status).
    With `workers` > 1 the cells run in that many worker processes, each pinned to one GPU
    (CUDA_VISIBLE_DEVICES, round robin over `gpu_ids()`); the kernels they launch inherit it.
    """
    nb_path = resolve(name)
    base = check_parameters(nb_path, load_preset(nb_path, preset))
    # Check every value of every cell before running any: a typo must not cost half a sweep.
    cells = [check_parameters(nb_path, c) for c in grid_cells(grid or {})]
    out_dir = Path(runs_dir) / nb_path.stem / "sweep"
    out_dir.mkdir(parents=True, exist_ok=True)

    results: dict[int, CellResult] = {}
    todo = []
    for i, varied in enumerate(cells):
        params = {**base, **varied}
        key = cell_key(params, preset, swept=list(grid or {}))
        status_file, output = out_dir / f"{key}.json", out_dir / f"{key}.ipynb"
        prev = {}
        if status_file.exists():
            with contextlib.suppress(ValueError, OSError):
                prev = json.loads(status_file.read_text())
        if prev.get("ok") and not force:
            results[i] = CellResult(key, varied, "skipped", str(output), records=prev.get("records", 0))
            continue
        todo.append((i, varied, {"nb_path": str(nb_path), "output": str(output), "params": params,
                                 "preset": preset, "status": str(status_file), "timeout": timeout,
                                 "env": dict(env or {})}))

    def done(i: int, varied: dict, spec: dict, st: dict) -> None:
        res = CellResult(Path(spec["output"]).stem, varied, "ok" if st.get("ok") else "failed", spec["output"],
                         st.get("error", ""), st.get("seconds", 0.0), st.get("gpu"), st.get("records", 0))
        results[i] = res
        if on_cell:
            on_cell(res)

    gpus = gpu_ids()
    if workers <= 1 or len(todo) <= 1:
        for i, varied, spec in todo:
            if gpus:
                spec["env"].setdefault("CUDA_VISIBLE_DEVICES", gpus[0])
            done(i, varied, spec, _run_cell(spec))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or threads
        pins = ctx.Queue()
        n = min(workers, len(todo))
        for w in range(n):
            pins.put(gpus[w % len(gpus)] if gpus else "")
        with ProcessPoolExecutor(n, mp_context=ctx, initializer=_pin_worker, initargs=(pins,)) as pool:
            futures = {pool.submit(_run_cell, spec): (i, varied, spec) for i, varied, spec in todo}
            for fut in as_completed(futures):
                i, varied, spec = futures[fut]
                try:
                    st = fut.result()
                except Exception as exc:  # the worker itself died: this cell failed, the rest go on
                    st = {"ok": False, "error": f"worker died: {error_of(exc)}"}
                    Path(spec["status"]).write_text(json.dumps({**st, "params": spec["params"]}, default=str))
                done(i, varied, spec, st)
    return [results[i] for i in range(len(cells))]


def _pin_worker(pins) -> None:
    """Worker-process initializer: take one GPU for the life of the worker."""
    gpu = pins.get()
    if gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def _run_cell(spec: dict) -> dict:
    """Run one sweep cell and write its status file (in the caller's process or a worker)."""
    output = Path(spec["output"])
    Path(spec["status"]).unlink(missing_ok=True)
    t0 = time.perf_counter()
    ok, error = execute(Path(spec["nb_path"]), output, spec["params"], run_id=uuid.uuid4().hex[:12],
                        preset=spec["preset"], env=spec.get("env"), timeout=spec.get("timeout"))
    st = {"ok": ok, "error": error, "params": spec["params"], "output": str(output),
          "records": len(records_in(output)), "seconds": round(time.perf_counter() - t0, 2),
          "gpu": (spec.get("env") or {}).get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES")),
          "utc": utc_stamp()}
    Path(spec["status"]).write_text(json.dumps(st, default=str))
    return st


def sweep_summary(results: list[CellResult]) -> str:
    lines = [f"{'status':<8} {'seconds':>8}  cell"]
    for r in results:
        varied = ", ".join(f"{k}={v}" for k, v in r.params.items())
        lines.append(f"{r.status:<8} {r.seconds:>8.1f}  {varied}" + (f"  [gpu {r.gpu}]" if r.gpu else ""))
        if r.error:
            lines.append(f"{'':<18}error: {r.error}")
    n = {s: sum(r.status == s for r in results) for s in ("ok", "failed", "skipped")}
    lines.append(f"{len(results)} cells: {n['ok']} ok, {n['failed']} failed, {n['skipped']} skipped "
                 f"(succeeded before; --force re-runs them)")
    return "\n".join(lines)
