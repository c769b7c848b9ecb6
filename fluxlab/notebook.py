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
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

_CHECKOUT = Path(__file__).resolve().parent.parent
REPO = str(_CHECKOUT)  # notebooks resolve relative config paths against the source checkout
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
    # The caller's folder goes on the kernel's path, so `-p target=mypkg.mod:T` imports the user's
    # own module although the kernel runs in notebooks/.
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    kernel_env = {"FLUXLAB_RUN_ID": run_id, "FLUXLAB_NOTEBOOK": nb_path.stem, "FLUXLAB_PRESET": preset,
                  "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONPATH": path, **(env or {})}
    if "TRITON_INTERPRET" not in os.environ and "TRITON_INTERPRET" not in kernel_env and not gpu_ids():
        kernel_env["TRITON_INTERPRET"] = "1"  # no GPU: run the Triton kernels interpreted, as `make` does
    try:
        with _environ(kernel_env):
            # kernel "python3": jupyter_client maps a kernelspec argv of "python" to sys.executable,
            # so the kernel is this environment's interpreter.
            papermill.execute_notebook(str(nb_path), str(output), parameters=params, kernel_name="python3",
                                       progress_bar=progress, cwd=str(nb_path.parent),
                                       execution_timeout=timeout, request_save_on_cell_execute=False,
                                       kernel_manager_class="fluxlab._kernel.QuietKernelManager")
    except Exception as exc:  # PapermillExecutionError, a dead kernel, a timeout...
        return False, _error_of(exc)
    return True, ""


def prepare_copy(name: str | os.PathLike, preset: str, output: str | os.PathLike, params: dict | None = None) -> Path:
    """The papermill-prepared copy (parameters injected, nothing executed) that CI hands to
    `pytest --nbval-lax`; parameters are checked exactly as for `run`."""
    import papermill

    nb_path, merged = prepare(name, preset, params)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(nb_path), str(output), parameters=merged, prepare_only=True,
                               kernel_name="python3", progress_bar=False)
    return Path(output)


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
    """(notebook, benchmark, verdict, ratio, 95% CI, reason) per record, plus a line for each run
    that failed or recorded nothing. The reason is the record's `metrics.reason`; an `inconclusive`
    row without one says so rather than leaving the reader to guess."""
    def reason(r: dict) -> str:
        why = str((r.get("metrics") or {}).get("reason") or "")
        if not why and r.get("verdict") == "inconclusive":
            return "(no reason recorded)"
        return " ".join(why.split())  # one line per row

    rows = [(str(r.get("notebook") or "-"), str(r.get("benchmark")),
             "measured" if r.get("verdict") is None else str(r.get("verdict")), _fmt(r.get("ratio")),
             "-" if r.get("ci_low") is None else f"[{_fmt(r.get('ci_low'))}, {_fmt(r.get('ci_high'))}]",
             reason(r))
            for r in records]
    for res in results or []:
        if not res.ok:
            rows.append((res.name, "(notebook failed)", "error", "-", "-", " ".join(res.error.split())[:200]))
        elif not res.records:
            rows.append((res.name, "(no records)", "-", "-", "-", ""))
    head = ("notebook", "benchmark", "verdict", "ratio", "95% CI", "reason")
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


def cell_key(params: dict, preset: str, swept=None) -> str:
    """A stable, readable file name for one grid cell: the swept keys' values (`swept`, in grid
    order; all parameters when None), then a short hash of the whole parameter set, so two sweeps
    over different fixed values never collide. Each value is cut to 40 characters, never a key."""
    text = json.dumps({"preset": preset, **params}, sort_keys=True, default=str)
    keys = list(swept) if swept is not None else sorted(params)
    parts = [re.sub(r"[^A-Za-z0-9._=-]+", "-", f"{k}={str(params[k])[:40]}").strip("-") for k in keys]
    return f"{'__'.join(parts) or 'defaults'}__{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def gpu_ids() -> list[str]:
    """The GPUs workers are pinned to: $CUDA_VISIBLE_DEVICES if set, else those `nvidia-smi -L`
    lists (no torch import, no CUDA context in the runner), else none."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return [g.strip() for g in vis.split(",") if g.strip()]
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


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
                    st = {"ok": False, "error": f"worker died: {_error_of(exc)}"}
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


# --- CLI ---------------------------------------------------------------------------------------
def cli(args) -> int:
    """`fluxlab notebook run | run-all | sweep` (see fluxlab.cli._add_notebook)."""
    from fluxlab.cli import parse_pairs as _pairs
    runs_dir = getattr(args, "runs_dir", None) or "runs"
    timeout = getattr(args, "timeout", None)
    if args.nb_cmd == "run":
        res = run(args.name, args.preset, _pairs(args.params), runs_dir=runs_dir, timeout=timeout)
        print(verdict_table(res.records, [res]))
        print(f"{'ok' if res.ok else 'FAILED'} in {res.seconds:.1f}s: {res.output}")
        if not res.ok:
            print(f"error: {res.error}", file=sys.stderr)
        return 0 if res.ok else 1
    if args.nb_cmd == "run-all":
        results = []
        for name in _run_all_names(args.preset):
            res = run(name, args.preset, runs_dir=runs_dir, timeout=timeout)
            print(f"{'ok' if res.ok else 'FAILED':<6} {res.seconds:>6.1f}s  {name}  -> {res.output}"
                  + (f"\n       error: {res.error}" if not res.ok else ""), flush=True)
            results.append(res)
        print()
        print(verdict_table([r for res in results for r in res.records], results))
        return 0 if all(r.ok for r in results) else 1
    if args.nb_cmd == "sweep":
        grid = {k: split_values(v) for k, v in _pairs(args.params).items()}
        results = sweep(args.name, args.preset, grid, workers=args.workers, force=args.force, runs_dir=runs_dir, timeout=timeout,
                        on_cell=lambda r: print(f"{r.status:<7} {r.key}", flush=True))
        print(sweep_summary(results))
        return 0 if all(r.status != "failed" for r in results) else 1
    raise ValueError(f"unknown notebook command {args.nb_cmd!r}")


def _run_all_names(preset: str) -> list[str]:
    have = [n for n in available() if preset_file(notebooks_dir() / f"{n}.ipynb", preset).exists()]
    return [n for n in NOTEBOOKS if n in have] + [n for n in have if n not in NOTEBOOKS]


# --- helpers the notebooks call (display only: no measuring, no deciding) -----------------------
def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def table_markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of `rows` (dicts), columns in first-seen order unless given."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def show_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Display rows as a table in the notebook (Markdown; plain text elsewhere)."""
    from IPython.display import Markdown, display

    display(Markdown(table_markdown(rows, columns) if rows else "_(no rows)_"))


def browse(records: list[dict], label=lambda r: f"{r.get('benchmark')} {r.get('verdict')}",
           fields: tuple[str, ...] = ("benchmark", "verdict", "ratio", "ci_low", "ci_high", "device_name",
                                      "params", "metrics")) -> None:
    """An ipywidgets browser over already-recorded results: a dropdown and the chosen record's
    fields. The callback only formats a stored record; it never measures. Shown once headless."""
    import ipywidgets as widgets
    from IPython.display import display

    if not records:
        print("no records to browse")
        return
    pick = widgets.Dropdown(options=[(label(r), i) for i, r in enumerate(records)], description="record")
    out = widgets.Output()

    def render(change=None):
        rec = records[pick.value]
        out.clear_output()
        with out:
            display({"text/markdown": table_markdown([{"field": f, "value": json.dumps(rec.get(f), default=str)[:200]}
                                                      for f in fields])}, raw=True)

    pick.observe(render, names="value")
    render()  # headless runs call it once
    display(widgets.VBox([pick, out]))


# --- regression analysis helpers (regression_analysis.ipynb) -------------------------------------
# Names benchmarks give the measured side of {candidate, baseline} samples (older records included).
CANDIDATE_KEYS = ("candidate", "variant", "impl", "ddp")


def series_samples(rec: dict) -> list[float] | None:
    """The times a record's series tracks: the candidate's samples of a comparison record, or a
    flat list of samples; None when the record holds fewer than 3 numbers."""
    s = rec.get("samples")
    if isinstance(s, dict):
        # The measured side of a comparison record. Never guess from key order: the store sorts
        # keys, so the first one is as likely the baseline ("baseline", "compiled", "single").
        s = next((s[k] for k in CANDIDATE_KEYS if k in s), None)
    if isinstance(s, list) and len(s) >= 3 and all(isinstance(x, (int, float)) and x > 0 for x in s):
        return [float(x) for x in s]
    return None


def _key_fields(key: tuple) -> dict:
    benchmark, device, params = key
    return {"benchmark": benchmark, "device": device, "params": params}


def latest_vs_baseline(groups: dict, baseline: str = "first") -> list[dict]:
    """Per series (one benchmark, device and parameter set; `store.series` groups them): the
    latest record's samples against the first (or previous) record's, by `bench.compare`.
    ratio > 1 means the latest run is faster."""
    from fluxlab import bench

    if baseline not in ("first", "previous"):
        raise ValueError(f"baseline must be 'first' or 'previous', got {baseline!r}")
    rows = []
    for key, recs in groups.items():
        timed = [r for r in recs if series_samples(r)]
        if len(timed) < 2:
            continue
        base, latest = (timed[0] if baseline == "first" else timed[-2]), timed[-1]
        devices = {str(r.get("device_name") or r.get("device")) for r in (base, latest)}
        assert len(devices) == 1, f"series {key} mixes devices {devices}"  # internal invariant
        # The latest record's own evidence (checked when it was measured), when it has any.
        ev = (latest.get("metrics") or {}).get("evidence")
        evidence = bench.Evidence(ran=bool(ev.get("ran")), reason=str(ev.get("reason", ""))) \
            if isinstance(ev, dict) and "ran" in ev else None
        c = bench.compare(series_samples(base), series_samples(latest), evidence=evidence)
        change = {"slower": "regression", "faster": "improvement"}.get(c.timing_verdict, "-")
        rows.append({**_key_fields(key), "n_records": len(timed), "baseline_id": base["id"][:8],
                     "latest_id": latest["id"][:8], "ratio": c.ratio, "ci_low": c.ci_low, "ci_high": c.ci_high,
                     "verdict": c.verdict, "timing": c.timing_verdict, "change": change, "reason": c.reason})
    return rows


def change_point_scan(groups: dict, min_points: int = 6) -> list[dict]:
    """`bench.change_points` over each series' per-record medians (series with >= min_points)."""
    import numpy as np

    from fluxlab import bench

    rows = []
    for key, recs in groups.items():
        med = [float(np.median(series_samples(r))) for r in recs if series_samples(r)]
        if len(med) < min_points:
            continue
        cps = bench.change_points(med)
        bounds = [0, *cps, len(med)]
        for j, cp in enumerate(cps):
            before = float(np.mean(med[bounds[j]:cp]))
            after = float(np.mean(med[cp:bounds[j + 2]]))
            rows.append({**_key_fields(key), "index": cp, "before_ms": before, "after_ms": after,
                         "change": "regression" if after > before else "improvement"})
        if not cps:
            rows.append({**_key_fields(key), "index": None, "before_ms": None, "after_ms": None, "change": "-"})
    return rows


def synthetic_history(n: int = 12, shift_at: int | None = 8, shift: float = 0.15, cv: float = 0.02,
                      samples: int = 15, seed: int = 0, benchmark: str = "control/planted") -> list[dict]:
    """A made-up series (device "synthetic") whose times rise by `shift` from record `shift_at`
    on (None: no shift): the positive and negative controls of the regression analysis."""
    import numpy as np

    from fluxlab import bench

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mean = 1.0 + (shift if shift_at is not None and i >= shift_at else 0.0)
        out.append({"id": f"{benchmark}-{i:04d}".ljust(12, "0"), "benchmark": benchmark, "device": "synthetic",
                    "device_name": "synthetic", "params": {"shift_at": shift_at, "shift": shift},
                    "utc": f"2000-01-01T00:00:{i:02d}Z", "verdict": None,
                    "samples": {"candidate": bench.lognormal_samples(rng, samples, cv=cv, mean=mean).tolist()}})
    return out


def measured_controls(trials: int = 30, repeats: int = 15, warmup: int = 2, device="cpu", seed: int = 0,
                      planted: float = 0.5) -> dict:
    """Real A/A and planted comparisons on this machine, each timed interleaved `trials` times.

    A/A: a 96x96 matmul against itself. Planted: against a 121x121 matmul, whose (121/96)^3 = 2.0x
    the work is a known slowdown. Torch runs on one thread here, as two threads on two shared
    cores would time the scheduler, not the op. Returns verdict counts per control and rates."""
    from collections import Counter

    import torch

    from fluxlab import bench

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(96, 96, generator=g).to(device)
    b = torch.randn(121, 121, generator=g).to(device)
    same = bench.Evidence(ran=True, reason="control: both sides run the code under test")
    counts = {"aa": Counter(), "planted": Counter()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(trials):
            m = bench.run({"A": lambda: a @ a, "A'": lambda: a @ a, "B": lambda: b @ b}, repeats=repeats,
                          warmup=warmup, device=device)
            counts["aa"][bench.compare(m.samples["A"], m.samples["A'"], evidence=same).verdict] += 1
            counts["planted"][bench.compare(m.samples["A"], m.samples["B"], evidence=same).verdict] += 1
    finally:
        torch.set_num_threads(threads)
    aa, pl = counts["aa"], counts["planted"]
    return {"trials": trials, "aa_verdicts": dict(aa), "planted_verdicts": dict(pl),
            "aa_false_positive_rate": (aa["faster"] + aa["slower"]) / trials,
            "aa_decisive_rate": aa["no-difference"] / trials,
            "planted_detection_rate": pl["slower"] / trials, "planted_work_ratio": (121 / 96) ** 3}


def false_positive_bound(trials: int, rate: float = 0.01, level: float = 0.999) -> int:
    """The most false positives `trials` A/A comparisons may show when the true rate is `rate`
    (the binomial `level` quantile): more than this and the rule is miscalibrated here."""
    from scipy import stats

    return int(stats.binom.ppf(level, trials, rate))
