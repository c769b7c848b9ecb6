"""The results store: one SQLite file (WAL) of records with full provenance
(docs/ARCHITECTURE.md, "Records").

A record is a flat JSON object: what was measured (`benchmark`, `verdict`, `ratio`, `ci_low`,
`ci_high`, `samples`, `metrics`), under which parameters, and where/when (git, host, device, driver,
package versions, UTC time). The row stores the whole record as JSON plus a few indexed columns, so
new fields never need a migration. Records travel three ways:
  * `record()` writes a row and shows the record in the notebook as `RECORD_MIME`;
  * `harvest(runs/)` rebuilds rows from those outputs in executed notebooks;
  * `export_records("json")` / `import_jsonl()` move them as JSON lines (benchmarks/results/*.jsonl),
    so the regression notebook sees GPU history on any machine. Both are idempotent by record `id`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import datetime as _dt
import io
import json
import math
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterable

from fluxlab import env as _env

RECORD_MIME = "application/vnd.fluxlab.record+json"

# Field order of exports. Extra keys (from provenance_overrides) are kept after these.
FIELDS = (
    "id", "run_id", "benchmark", "verdict", "ratio", "ci_low", "ci_high", "device", "device_name",
    "notebook", "params", "metrics", "samples", "utc", "git_commit", "git_dirty", "git_diff_sha256",
    "supersedes", "host", "driver",
    "cuda", "torch", "triton", "diffusers", "peft", "transformers", "python", "triton_mode",
)
# Fields no override may set: identity, time, the verdict and where the code came from.
PROTECTED = ("id", "utc", "verdict", "git_commit", "git_dirty", "git_diff_sha256")
# Verdicts that claim a speed difference: they need an evidence check that the fast path ran.
SPEED_VERDICTS = ("faster", "slower")
# Record keys that also live in their own column, so query() can filter in SQL.
_COLUMNS = ("id", "run_id", "benchmark", "verdict", "device", "device_name", "notebook", "utc")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS records (
    {", ".join(f"{c} TEXT" + (" PRIMARY KEY" if c == "id" else "") for c in _COLUMNS)},
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_benchmark ON records (benchmark, device_name);
"""

_CHECKOUT = Path(__file__).resolve().parent.parent
_RUN_ID: str | None = None


from fluxlab.errors import UserError  # noqa: E402


class StoreError(UserError, RuntimeError):
    """The store file cannot be used (corrupt, not SQLite, unwritable) or an input file is bad."""


def _corrupt(path: Path, why: str) -> StoreError:
    return StoreError(
        f"results store {path} is corrupt or not a SQLite file ({why}). Move it aside "
        f"(mv {path} {path}.bad) and rebuild it with `fluxlab results import benchmarks/results/` "
        f"and `fluxlab results harvest runs/`.")


def _check_file(path: Path) -> None:
    """Refuse a damaged store before SQLite opens it: SQLite reads a 0-byte file as an empty
    database, and a truncated one until it reaches the missing page."""
    size = path.stat().st_size
    if size == 0:
        raise _corrupt(path, "0 bytes, so not an empty store but a lost one")
    with open(path, "rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        raise _corrupt(path, "no SQLite header")
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or size % page:
        raise _corrupt(path, f"{size} bytes is not a whole number of {page}-byte pages: truncated")


def _create(path: Path) -> None:
    """Create an empty store whole (schema and WAL mode in a temp file, then linked into place), so
    a 0-byte file at `path` can only mean damage, never a store being born."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        conn = sqlite3.connect(tmp)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            conn.commit()
        finally:
            conn.close()
        try:
            os.link(tmp, path)  # fails if another process created it first: theirs stands
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            if not path.exists():
                os.replace(tmp, path)
    finally:
        for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            p.unlink(missing_ok=True)


# --- where and who ----------------------------------------------------------------------------
def default_store_path() -> Path:
    """$FLUXLAB_STORE, else results/fluxlab.db in the source checkout (so notebooks run from
    notebooks/ and the CLI run from the root share one store), else under the working directory."""
    if os.environ.get("FLUXLAB_STORE"):
        return Path(os.environ["FLUXLAB_STORE"])
    root = _CHECKOUT if (_CHECKOUT / "pyproject.toml").exists() else Path.cwd()
    return root / "results" / "fluxlab.db"


def run_id() -> str:
    """$FLUXLAB_RUN_ID (set by the notebook runner so all records of one run share it), else one
    id per process."""
    global _RUN_ID
    if os.environ.get("FLUXLAB_RUN_ID"):
        return os.environ["FLUXLAB_RUN_ID"]
    if _RUN_ID is None:
        _RUN_ID = uuid.uuid4().hex[:12]
    return _RUN_ID


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_CHECKOUT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None  # no git, or it hung: provenance says "unknown" rather than failing a run
    return out.stdout if out.returncode == 0 else None


def _diff_hash() -> str | None:
    """sha256 of what makes the tree dirty: the diff against HEAD plus untracked files' names and
    bytes, so a record from a dirty tree still names exactly what it ran."""
    diff = _git("diff", "HEAD", "--binary")
    if diff is None:
        return None
    h = hashlib.sha256(diff.encode())
    for name in sorted((_git("ls-files", "--others", "--exclude-standard") or "").splitlines()):
        h.update(name.encode())
        with contextlib.suppress(OSError):
            h.update((_CHECKOUT / name).read_bytes())
    return h.hexdigest()


def provenance(notebook: str | None = None, params: dict | None = None) -> dict:
    """Run id, notebook and parameters, git commit, dirty flag and a diff hash when dirty, host,
    device, driver, package versions and UTC time. Cheap: no imports beyond what is loaded; git
    with a timeout."""
    if os.environ.get("FLUXLAB_GIT_COMMIT"):
        # A tree shipped to a GPU box, whose .git (if any) may be stale: the caller states which
        # commit it is, and vouches for cleanliness with FLUXLAB_GIT_DIRTY=0 (or names the diff's hash).
        commit = os.environ["FLUXLAB_GIT_COMMIT"]
        status = "dirty" if os.environ.get("FLUXLAB_GIT_DIRTY", "1") != "0" else ""
        diff_hash = os.environ.get("FLUXLAB_GIT_DIFF_HASH") or None
    else:
        commit = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain") if commit is not None else None
        diff_hash = _diff_hash() if status and status.strip() else None
    prov = {
        "run_id": run_id(),
        "notebook": notebook or os.environ.get("FLUXLAB_NOTEBOOK"),
        "params": dict(params or {}),
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(status.strip()) if status is not None else None,
        "git_diff_sha256": diff_hash,
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z"),
    }
    prov.update(_env.environment())
    return prov


# --- JSON helpers -----------------------------------------------------------------------------
def _jsonable(x):
    """numpy/torch values -> plain JSON; NaN/inf -> None (Jupyter front ends reject bare NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy arrays/scalars, tensors
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def _canonical(obj) -> str:
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"))


# --- the database -----------------------------------------------------------------------------
def _path(store) -> Path:
    return Path(store) if store is not None else default_store_path()


@contextlib.contextmanager
def _connect(store):
    """A connection in WAL mode with a generous busy timeout (concurrent writers wait, never drop
    rows), whose SQLite errors become StoreErrors naming the file and what to do."""
    path = _path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _create(path)
    _check_file(path)
    conn = None
    try:
        conn = sqlite3.connect(path, timeout=60)
        conn.execute("PRAGMA journal_mode=WAL")
        # Nothing is read from or written into a damaged file (quick_check: milliseconds at this size).
        problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise _corrupt(path, f"quick_check: {problems[0]}")
        conn.executescript(_SCHEMA)
        yield conn
        conn.commit()
    except sqlite3.OperationalError as e:  # locked past the timeout, unwritable, ...
        raise StoreError(f"results store {path}: {e}") from e
    except sqlite3.DatabaseError as e:  # "file is not a database", "disk image is malformed"
        raise _corrupt(path, str(e)) from e
    finally:
        if conn is not None:
            conn.close()


def _insert(conn: sqlite3.Connection, records: Iterable[dict]) -> int:
    """INSERT OR IGNORE by id; returns how many rows were new."""
    before = conn.total_changes
    conn.executemany(
        f"INSERT OR IGNORE INTO records ({', '.join(_COLUMNS)}, body) VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})",
        [tuple(None if r.get(c) is None else str(r[c]) for c in _COLUMNS) + (_canonical(r),) for r in records])
    return conn.total_changes - before


def _ordered(rec: dict) -> dict:
    return {**{k: rec.get(k) for k in FIELDS}, **{k: v for k, v in rec.items() if k not in FIELDS}}


# --- the public API ---------------------------------------------------------------------------
def _summary(rec: dict) -> str:
    ratio = "" if rec.get("ratio") is None else f" ratio={rec['ratio']:.3f}"
    ci = "" if rec.get("ci_low") is None else f" (95% CI {rec['ci_low']:.3f}-{rec['ci_high']:.3f})"
    return (f"fluxlab record {rec['benchmark']} [{rec.get('device_name') or rec.get('device')}] "
            f"verdict={rec.get('verdict')}{ratio}{ci} id={rec['id'][:8]}")


def record(benchmark: str, *, verdict=None, ratio=None, ci_low=None, ci_high=None, samples=None,
           metrics: dict | None = None, params: dict | None = None, notebook: str | None = None,
           device=None, store=None, display: bool = True, supersedes: str | None = None,
           provenance_overrides: dict | None = None) -> dict:
    """Write one record (with provenance and raw samples) to the store and return it.

    Inside IPython it is also displayed as `RECORD_MIME`, which is how `harvest()` finds it later.
    `samples` may be a list or a dict of lists (e.g. {"baseline": [...], "candidate": [...]}).
    A `faster`/`slower` verdict needs `metrics["evidence"]` showing the fast path ran (as
    `Comparison.record_fields()` carries it); without it the record says `unverified`.
    `supersedes` names the id of an earlier record this one corrects (records are never edited).
    `provenance_overrides` may not touch the fields in PROTECTED.
    """
    if not benchmark or not isinstance(benchmark, str):
        raise ValueError(f"record(): benchmark must be a non-empty string, got {benchmark!r}")
    blocked = sorted(set(provenance_overrides or {}) & set(PROTECTED))
    if blocked:
        raise ValueError(f"record(): provenance_overrides may not set {blocked} (protected: {', '.join(PROTECTED)})")
    metrics = dict(metrics or {})
    evidence = metrics.get("evidence")
    if verdict in SPEED_VERDICTS and not (isinstance(evidence, dict) and evidence.get("ran") is True):
        metrics.setdefault("timing_verdict", verdict)
        metrics["unverified_reason"] = "no evidence check that the fast path ran"
        verdict = "unverified"
    rec = provenance(notebook=notebook, params=params)
    rec.update({"id": uuid.uuid4().hex, "benchmark": benchmark, "verdict": verdict, "ratio": ratio,
                "ci_low": ci_low, "ci_high": ci_high, "samples": samples, "metrics": metrics,
                "supersedes": supersedes})
    if device is not None:
        rec["device"] = str(device)
    rec.update(provenance_overrides or {})
    rec = _jsonable(_ordered(rec))
    with _connect(store) as conn:
        _insert(conn, [rec])
    if display and "IPython" in sys.modules:
        from IPython import get_ipython
        from IPython.display import display as _display

        if get_ipython() is not None:
            _display({RECORD_MIME: rec, "text/plain": _summary(rec)}, raw=True)
    return rec


def query(store=None, **filters) -> list[dict]:
    """Records matching all `filters` (exact equality on record fields), oldest first."""
    unknown = [k for k in filters if k not in FIELDS]
    if unknown:
        raise ValueError(f"query(): unknown field(s) {unknown}; known fields: {', '.join(FIELDS)}")
    if not _path(store).exists():
        return []  # reading must not create an empty store as a side effect
    sql_filters = {k: v for k, v in filters.items() if k in _COLUMNS}
    where = " AND ".join(f"{k} = ?" for k in sql_filters) or "1"
    with _connect(store) as conn:
        rows = conn.execute(f"SELECT body FROM records WHERE {where} ORDER BY utc, rowid",
                            [str(v) for v in sql_filters.values()]).fetchall()
    records = []
    for (body,) in rows:
        try:
            rec = json.loads(body)
        except (TypeError, ValueError) as e:  # a damaged row (the file passed SQLite's checks)
            raise _corrupt(_path(store), f"a record is not valid JSON: {e}") from e
        if not isinstance(rec, dict):
            raise _corrupt(_path(store), "a record is not a JSON object")
        records.append(rec)
    rest = {k: _jsonable(v) for k, v in filters.items() if k not in _COLUMNS}
    return [_ordered(r) for r in records if all(r.get(k) == v for k, v in rest.items())]


def export_records(fmt: str = "json", store=None, records: list[dict] | None = None) -> str:
    """All records as JSON lines ("json") or CSV ("csv"; nested fields JSON-encoded)."""
    records = query(store) if records is None else [_ordered(r) for r in records]
    if fmt == "json":
        return "".join(json.dumps(r, sort_keys=False) + "\n" for r in records)
    if fmt == "csv":
        columns = list(FIELDS) + sorted({k for r in records for k in r} - set(FIELDS))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})
        return buf.getvalue()
    raise ValueError(f"export_records(): fmt must be 'json' or 'csv', got {fmt!r}")


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(path.glob("*.jsonl"))
    if path.exists():
        return [path]
    raise FileNotFoundError(f"{path} does not exist (expected a .jsonl file or a folder of them)")


def import_jsonl(path_or_dir, store=None) -> int:
    """Load exported records (one JSON object per line); returns how many were new. Idempotent."""
    records = []
    for file in _jsonl_files(Path(path_or_dir)):
        for lineno, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise StoreError(f"{file}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(rec, dict) or not rec.get("id") or not rec.get("benchmark"):
                raise StoreError(f"{file}:{lineno}: a record needs at least 'id' and 'benchmark'")
            records.append(rec)
    with _connect(store) as conn:
        return _insert(conn, records)


def records_in_notebook(nb_path) -> list[dict]:
    """The `RECORD_MIME` outputs of one executed .ipynb (read as plain JSON: no nbformat needed)."""
    try:
        nb = json.loads(Path(nb_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{nb_path}: not a readable notebook ({e})") from e
    found = []
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            data = out.get("data", {}) if out.get("output_type") in ("display_data", "execute_result") else {}
            rec = data.get(RECORD_MIME)
            if isinstance(rec, str):  # some writers store JSON MIME bundles as text
                rec = json.loads(rec)
            if isinstance(rec, dict) and rec.get("id") and rec.get("benchmark"):
                found.append(rec)
    return found


def harvest(runs_dir="runs", store=None) -> int:
    """Rebuild rows from every executed notebook under `runs_dir`; returns how many were new."""
    runs = Path(runs_dir)
    if not runs.is_dir():
        raise FileNotFoundError(f"{runs} is not a folder of executed notebooks")
    records = [r for nb in sorted(runs.rglob("*.ipynb")) if ".ipynb_checkpoints" not in nb.parts
               for r in records_in_notebook(nb)]
    with _connect(store) as conn:
        return _insert(conn, records)


def series_key(rec: dict) -> tuple[str, str, str]:
    """(benchmark, device, canonical params): only records with equal keys are comparable. The
    clock that timed the samples counts as a parameter (`metrics.timing.clock`, set by
    `bench.run`), so samples taken one way are never compared with samples taken another."""
    params = dict(rec.get("params") or {})
    timing = (rec.get("metrics") or {}).get("timing")
    if isinstance(timing, dict) and timing.get("clock"):
        params["_clock"] = timing["clock"]
    return (rec["benchmark"], str(rec.get("device_name") or rec.get("device")), _canonical(params))


def series(records: Iterable[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Group records into comparable series (never across devices or parameter sets), by time."""
    out: dict[tuple[str, str, str], list[dict]] = {}
    for rec in records:
        out.setdefault(series_key(rec), []).append(rec)
    return {k: sorted(v, key=lambda r: r.get("utc") or "") for k, v in out.items()}
