"""The papermill runner: `fluxlab notebook run | run-all | sweep` (DESIGN.md §4).

* Parameters are checked against `papermill.inspect_notebook` before anything runs, because
  papermill itself only warns on unknown names: an unknown or mistyped name is refused with a
  "did you mean", and a value that does not parse as the declared type is refused too.
* `run` writes `runs/<name>/<utc-stamp>_<run_id>.ipynb` and reports failure (the CLI exits 1).
  The kernel gets FLUXLAB_RUN_ID / FLUXLAB_NOTEBOOK / FLUXLAB_PRESET in its environment so that
  every record the notebook writes (fluxlab.store) carries the run's id and the notebook's name.
* `sweep` runs a parameter grid: one output notebook and one status file per grid cell, each in
  its own process (so each can be pinned to one GPU with CUDA_VISIBLE_DEVICES). A failed cell
  never stops the others; a re-run skips cells whose status says they succeeded, unless forced.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import hashlib
import itertools
import json
import os
import queue
import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

_CHECKOUT = Path(__file__).resolve().parent.parent
# run-all order: the store-reading regression analysis runs last, so it sees this run's records.
NOTEBOOKS = ("validation_session", "memory_graphs", "gradient_flow", "inference_session", "regression_analysis")
PRESETS = ("ci", "full")
RECORD_MIME = "application/vnd.fluxlab.record+json"


class ParameterError(ValueError):
    """A notebook parameter the notebook does not declare, or a value of the wrong type."""


# --- where things are --------------------------------------------------------------------------
def notebooks_dir() -> Path:
    """$FLUXLAB_NOTEBOOKS, else notebooks/ of the source checkout, else ./notebooks."""
    if os.environ.get("FLUXLAB_NOTEBOOKS"):
        return Path(os.environ["FLUXLAB_NOTEBOOKS"])
    here = _CHECKOUT / "notebooks"
    return here if here.is_dir() else Path.cwd() / "notebooks"


def resolve(name: str | os.PathLike) -> Path:
    """A notebook by name (`validation_session`) or by path (`some/dir/x.ipynb`)."""
    p = Path(name)
    if p.suffix == ".ipynb":
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such notebook")
        return p
    path = notebooks_dir() / f"{name}.ipynb"
    if not path.exists():
        known = available()
        hint = difflib.get_close_matches(str(name), known, n=1)
        raise ParameterError(f"unknown notebook {str(name)!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                             + f" (known: {', '.join(known) or 'none'})")
    return path


def available() -> list[str]:
    return sorted(p.stem for p in notebooks_dir().glob("*.ipynb"))


def preset_file(nb_path: Path, preset: str) -> Path:
    return nb_path.parent / "params" / preset / f"{nb_path.stem}.yaml"


def load_preset(nb_path: Path, preset: str) -> dict:
    """params/<preset>/<name>.yaml beside the notebook ({} when there is none)."""
    if preset not in PRESETS:
        raise ParameterError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    path = preset_file(nb_path, preset)
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParameterError(f"{path}: expected a mapping of parameter: value")
    return data


# --- parameter checks ---------------------------------------------------------------------------
def declared(nb_path: Path) -> dict[str, dict]:
    """name -> {inferred_type_name, default, help}, as `papermill --help-notebook` shows them."""
    import papermill

    params = papermill.inspect_notebook(str(nb_path))
    if not params:
        raise ParameterError(f"{nb_path}: no cell tagged 'parameters' (or it declares nothing)")
    return params


_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict}


def _coerce(name: str, value, type_name: str):
    """Turn a CLI string (or a YAML value) into the declared type, or refuse it."""
    base = type_name.split("[", 1)[0].strip()
    want = _TYPES.get(base)
    if want is None:  # None / Optional / Any: take what YAML makes of it
        return yaml.safe_load(value) if isinstance(value, str) else value
    if want is str:
        return value if isinstance(value, str) else str(value)
    parsed = value
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ParameterError(f"parameter {name!r} expects {base}, got {value!r} ({e.problem})") from None
    ok = (isinstance(parsed, want) and not (want is int and isinstance(parsed, bool))) or \
         (want is float and isinstance(parsed, int) and not isinstance(parsed, bool))
    if not ok:
        raise ParameterError(f"parameter {name!r} expects {base}, got {value!r}")
    return float(parsed) if want is float else parsed


def check_parameters(nb_path: Path, params: dict) -> dict:
    """Refuse names the notebook does not declare ("did you mean ...") and values that are not
    of the declared type; return the values converted to their types."""
    decl = declared(nb_path)
    out = {}
    for name, value in params.items():
        if name not in decl:
            hint = difflib.get_close_matches(name, list(decl), n=1, cutoff=0.6)
            raise ParameterError(
                f"{nb_path.stem}: unknown parameter {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" Declared: {', '.join(decl)}")
        out[name] = _coerce(name, value, decl[name]["inferred_type_name"])
    return out


def split_values(text: str) -> list[str]:
    """`a,b,[1, 2]` -> ['a', 'b', '[1, 2]']: commas inside brackets or quotes do not split."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += ch
    parts.append(cur.strip())
    return [p for p in parts if p != ""]


# --- one run -----------------------------------------------------------------------------------
@dataclass
class RunResult:
    name: str
    output: str
    ok: bool
    params: dict
    run_id: str
    seconds: float
    error: str = ""
    records: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


@contextlib.contextmanager
def _environ(extra: dict[str, str]):
    """Set variables for a kernel launched inside the block (kernels inherit os.environ)."""
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update({k: str(v) for k, v in extra.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def records_in(output: Path) -> list[dict]:
    """The records an executed notebook displayed (`RECORD_MIME` outputs)."""
    from fluxlab.store import records_in_notebook

    try:
        return records_in_notebook(output)
    except Exception:  # a half-written output: no records rather than a second error
        return []


def _error_of(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        cell = getattr(exc, "exec_count", None)
        return f"{ename}: {evalue}" + (f" (cell [{cell}])" if cell is not None else "")
    return f"{type(exc).__name__}: {exc}"


def prepare(name: str | os.PathLike, preset: str = "ci", params: dict | None = None) -> tuple[Path, dict]:
    """Resolve the notebook and return (path, checked parameters: preset file, then `params`)."""
    nb_path = resolve(name)
    base = check_parameters(nb_path, load_preset(nb_path, preset))
    merged = {**base, **check_parameters(nb_path, dict(params or {}))}
    return nb_path, merged


def execute(nb_path: Path, output: Path, params: dict, *, run_id: str, preset: str,
            env: dict | None = None, timeout: float | None = None, progress: bool = False) -> tuple[bool, str]:
    """Run one notebook through papermill into `output`; (ok, error text)."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    kernel_env = {"FLUXLAB_RUN_ID": run_id, "FLUXLAB_NOTEBOOK": nb_path.stem, "FLUXLAB_PRESET": preset,
                  "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), **(env or {})}
    try:
        with _environ(kernel_env):
            # kernel "python3": jupyter_client maps a kernelspec argv of "python" to sys.executable,
            # so the kernel is this environment's interpreter.
            papermill.execute_notebook(str(nb_path), str(output), parameters=params, kernel_name="python3",
                                       progress_bar=progress, cwd=str(nb_path.parent),
                                       execution_timeout=timeout, request_save_on_cell_execute=False)
    except Exception as exc:  # PapermillExecutionError, a dead kernel, a timeout...
        return False, _error_of(exc)
    return True, ""


def run(name: str | os.PathLike, preset: str = "ci", params: dict | None = None, *,
        runs_dir: str | os.PathLike = "runs", env: dict | None = None, timeout: float | None = None,
        progress: bool = False) -> RunResult:
    """Check parameters, run the notebook, and return what happened (never raises on a failed cell)."""
    nb_path, merged = prepare(name, preset, params)
    run_id = uuid.uuid4().hex[:12]
    output = Path(runs_dir) / nb_path.stem / f"{utc_stamp()}_{run_id}.ipynb"
    t0 = time.perf_counter()
    ok, error = execute(nb_path, output, merged, run_id=run_id, preset=preset, env=env, timeout=timeout,
                        progress=progress)
    return RunResult(name=nb_path.stem, output=str(output), ok=ok, params=merged, run_id=run_id,
                     seconds=round(time.perf_counter() - t0, 2), error=error, records=records_in(output))


def run_all(preset: str = "ci", *, runs_dir: str | os.PathLike = "runs", names=None,
            env: dict | None = None, progress: bool = False) -> list[RunResult]:
    """Every notebook that has a params/<preset>/ file, in NOTEBOOKS order (then any others)."""
    return [run(n, preset, runs_dir=runs_dir, env=env, progress=progress) for n in (names or _run_all_names(preset))]


# --- tables ------------------------------------------------------------------------------------
def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def verdict_table(records: list[dict], results: list[RunResult] | None = None) -> str:
    """(notebook, benchmark, verdict, ratio, 95% CI) per record, plus a line for each run that
    failed or recorded nothing."""
    rows = [(str(r.get("notebook") or "-"), str(r.get("benchmark")), str(r.get("verdict")),
             _fmt(r.get("ratio")),
             "-" if r.get("ci_low") is None else f"[{_fmt(r.get('ci_low'))}, {_fmt(r.get('ci_high'))}]")
            for r in records]
    for res in results or []:
        if not res.ok:
            rows.append((res.name, "(notebook failed)", "error", "-", res.error[:60]))
        elif not res.records:
            rows.append((res.name, "(no records)", "-", "-", "-"))
    head = ("notebook", "benchmark", "verdict", "ratio", "95% CI")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *map(line, rows)])


# --- sweeps ------------------------------------------------------------------------------------
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


def cell_key(params: dict, preset: str) -> str:
    """A stable, readable file name for one grid cell: the varied values plus a short hash of
    the whole parameter set (so two sweeps over different fixed values never collide)."""
    text = json.dumps({"preset": preset, **params}, sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "-", "_".join(f"{k}={v}" for k, v in sorted(params.items())))[:80]
    return f"{slug.strip('-')}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def gpu_ids() -> list[str]:
    """The GPUs workers are pinned to: $CUDA_VISIBLE_DEVICES if set, else all torch sees."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return [g.strip() for g in vis.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def sweep(name: str | os.PathLike, preset: str = "full", grid: dict[str, list] | None = None, *,
          workers: int = 1, force: bool = False, runs_dir: str | os.PathLike = "runs",
          env: dict | None = None, timeout: float | None = None, on_cell=None) -> list[CellResult]:
    """Run every cell of `grid` (name -> list of values) as its own notebook run, in `workers`
    processes. Each output is runs/<name>/sweep/<cell-key>.ipynb beside <cell-key>.json (status)."""
    nb_path = resolve(name)
    base = check_parameters(nb_path, load_preset(nb_path, preset))
    # Check every value of every cell before running any: a typo must not cost half a sweep.
    cells = [check_parameters(nb_path, c) for c in grid_cells(grid or {})]
    out_dir = Path(runs_dir) / nb_path.stem / "sweep"
    out_dir.mkdir(parents=True, exist_ok=True)
    gpus = gpu_ids()
    slots: queue.Queue[int] = queue.Queue()
    for w in range(max(1, workers)):
        slots.put(w)

    def one(varied: dict) -> CellResult:
        params = {**base, **varied}
        key = cell_key(params, preset)
        status_file, output = out_dir / f"{key}.json", out_dir / f"{key}.ipynb"
        if not force and status_file.exists():
            with contextlib.suppress(ValueError, OSError):
                prev = json.loads(status_file.read_text())
                if prev.get("ok"):
                    return CellResult(key, varied, "skipped", str(output), records=prev.get("records", 0))
        slot = slots.get()
        gpu = gpus[slot % len(gpus)] if gpus else None
        try:
            spec = {"nb_path": str(nb_path), "output": str(output), "params": params, "preset": preset,
                    "status": str(status_file), "timeout": timeout,
                    "env": {**(env or {}), **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}}
            status_file.unlink(missing_ok=True)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "fluxlab.notebook", "--cell", json.dumps(spec)],
                                  capture_output=True, text=True)
            seconds = round(time.perf_counter() - t0, 2)
        finally:
            slots.put(slot)
        try:
            st = json.loads(status_file.read_text())
        except (OSError, ValueError):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            st = {"ok": False, "error": f"cell process died: {tail[0]}", "records": 0}
            status_file.write_text(json.dumps({**st, "params": params}))
        res = CellResult(key, varied, "ok" if st.get("ok") else "failed", str(output), st.get("error", ""),
                         seconds, gpu, st.get("records", 0))
        if on_cell:
            on_cell(res)
        return res

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, cells))


def _run_cell(spec: dict) -> int:
    """Child process of `sweep`: run one cell and write its status file."""
    output = Path(spec["output"])
    ok, error = execute(Path(spec["nb_path"]), output, spec["params"], run_id=uuid.uuid4().hex[:12],
                        preset=spec["preset"], env=spec.get("env"), timeout=spec.get("timeout"))
    Path(spec["status"]).write_text(json.dumps(
        {"ok": ok, "error": error, "params": spec["params"], "output": str(output),
         "records": len(records_in(output)), "utc": utc_stamp()}, default=str))
    return 0 if ok else 1


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


# --- CLI ---------------------------------------------------------------------------------------
def _pairs(values: list[str] | None) -> dict[str, str]:
    out = {}
    for item in values or []:
        if "=" not in item:
            raise ParameterError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def cli(args) -> int:
    """`fluxlab notebook run | run-all | sweep` (see fluxlab.cli._add_notebook)."""
    runs_dir = getattr(args, "runs_dir", None) or "runs"
    if args.nb_cmd == "run":
        res = run(args.name, args.preset, _pairs(args.params), runs_dir=runs_dir)
        print(verdict_table(res.records, [res]))
        print(f"{'ok' if res.ok else 'FAILED'} in {res.seconds:.1f}s: {res.output}")
        if not res.ok:
            print(f"error: {res.error}", file=sys.stderr)
        return 0 if res.ok else 1
    if args.nb_cmd == "run-all":
        results = []
        for name in _run_all_names(args.preset):
            res = run(name, args.preset, runs_dir=runs_dir)
            print(f"{'ok' if res.ok else 'FAILED':<6} {res.seconds:>6.1f}s  {name}  -> {res.output}"
                  + (f"\n       error: {res.error}" if not res.ok else ""), flush=True)
            results.append(res)
        print()
        print(verdict_table([r for res in results for r in res.records], results))
        return 0 if all(r.ok for r in results) else 1
    if args.nb_cmd == "sweep":
        grid = {k: split_values(v) for k, v in _pairs(args.params).items()}
        results = sweep(args.name, args.preset, grid, workers=args.workers, force=args.force, runs_dir=runs_dir,
                        on_cell=lambda r: print(f"{r.status:<7} {r.key}", flush=True))
        print(sweep_summary(results))
        return 0 if all(r.status != "failed" for r in results) else 1
    raise ValueError(f"unknown notebook command {args.nb_cmd!r}")


def _run_all_names(preset: str) -> list[str]:
    have = [n for n in available() if preset_file(notebooks_dir() / f"{n}.ipynb", preset).exists()]
    return [n for n in NOTEBOOKS if n in have] + [n for n in have if n not in NOTEBOOKS]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--cell":
        sys.exit(_run_cell(json.loads(sys.argv[2])))
    sys.exit("usage: python -m fluxlab.notebook --cell SPEC_JSON (internal; use `fluxlab notebook`)")
