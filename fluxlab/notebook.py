"""The papermill runner: one notebook, checked parameters, one output file (docs/ARCHITECTURE.md, "Notebooks").

* Parameters are checked against `papermill.inspect_notebook` before anything runs, because
  papermill itself only warns on unknown names: an unknown or mistyped name is refused with a
  "did you mean", and a value that does not parse as the declared type is refused too.
* `run` writes `runs/<name>/<utc-stamp>_<run_id>.ipynb` and reports failure (the CLI exits 1).
  The kernel gets FLUXLAB_RUN_ID / FLUXLAB_NOTEBOOK / FLUXLAB_PRESET in its environment so that
  every record the notebook writes (fluxlab.store) carries the run's id and the notebook's name.

Parameter grids are `fluxlab.sweeps`; the tables notebooks show are `fluxlab.tables`; the
regression analysis is `fluxlab.measure.regression`; the command line is `fluxlab.commands.notebook`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from fluxlab.errors import UserError
from fluxlab.store import records_in_notebook


_CHECKOUT = Path(__file__).resolve().parent.parent
REPO = str(_CHECKOUT)  # notebooks resolve relative config paths against the source checkout
# run-all order: the store-reading regression analysis runs last, so it sees this run's records.
NOTEBOOKS = ("validation_session", "memory_graphs", "gradient_flow", "inference_session", "regression_analysis")
PRESETS = ("ci", "full")
RECORD_MIME = "application/vnd.fluxlab.record+json"


class ParameterError(UserError, ValueError):
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
    try:
        return records_in_notebook(output)
    except Exception:  # a half-written output: no records rather than a second error
        return []


def error_of(exc: BaseException) -> str:
    """One line saying why a notebook run failed (the failing cell's exception when papermill names it)."""
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
        return False, error_of(exc)
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
    return [run(n, preset, runs_dir=runs_dir, env=env, progress=progress) for n in (names or run_all_names(preset))]


def gpu_ids() -> list[str]:
    """The GPUs workers are pinned to: $CUDA_VISIBLE_DEVICES if set, else those `nvidia-smi -L`
    lists (no torch import, no CUDA context in the runner), else none."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return [g.strip() for g in vis.split(",") if g.strip()]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


def run_all_names(preset: str) -> list[str]:
    """The notebooks `run-all` runs: those with a params/<preset>/ file, in NOTEBOOKS order, then the rest."""
    have = [n for n in available() if preset_file(notebooks_dir() / f"{n}.ipynb", preset).exists()]
    return [n for n in NOTEBOOKS if n in have] + [n for n in have if n not in NOTEBOOKS]
