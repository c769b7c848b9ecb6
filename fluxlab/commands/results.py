"""`fluxlab results list|export|import|harvest`: the SQLite results store."""

from __future__ import annotations

import sys

from fluxlab._atomic import atomic_write_text


def add(sub) -> None:
    p = sub.add_parser("results", help="the results store")
    p.add_argument("--store", default=None, help="path of the SQLite store (default: $FLUXLAB_STORE or results/fluxlab.db)")
    s = p.add_subparsers(dest="results_cmd", required=True)
    s.add_parser("list", help="one line per record")
    e = s.add_parser("export", help="export records")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--json", action="store_true", help="JSON lines")
    g.add_argument("--csv", action="store_true")
    e.add_argument("--out", default="-")
    i = s.add_parser("import", help="load *.jsonl records (e.g. benchmarks/results/)")
    i.add_argument("path")
    h = s.add_parser("harvest", help="rebuild records from executed notebooks under a runs/ folder")
    h.add_argument("path", nargs="?", default="runs")
    p.set_defaults(func=run)


def run(args) -> int:
    from fluxlab import store

    try:
        if args.results_cmd == "list":
            return _list(args.store)
        if args.results_cmd == "export":
            recs = store.query(args.store)
            text = store.export_records("json" if args.json else "csv", records=recs)
            if args.out in (None, "-"):
                sys.stdout.write(text)
            else:
                atomic_write_text(args.out, text)
                print(f"{len(recs)} records written to {args.out}")
            return 0
        if args.results_cmd == "import":
            n = store.import_jsonl(args.path, args.store)
            print(f"{n} new records imported from {args.path} into {store._path(args.store)}")
            return 0
        if args.results_cmd == "harvest":
            n = store.harvest(args.path, args.store)
            print(f"{n} new records harvested from {args.path} into {store._path(args.store)}")
            return 0
    except store.StoreError as e:
        print(f"fluxlab: error: {e}", file=sys.stderr)
        return 2
    raise ValueError(f"unknown results command {args.results_cmd!r}")


def _list(store_path) -> int:
    """One row per record under a header; a record without a verdict is a plain measurement (no
    comparison), shown as `measured`."""
    from fluxlab import store

    recs = store.query(store_path)
    if not recs:
        print(f"no records in {store_path or store.default_store_path()}")
        return 0
    head = ("utc", "benchmark", "device", "verdict", "ratio", "95% CI", "id")
    rows = [(str(r.get("utc") or "?")[:19], str(r["benchmark"]), str(r.get("device_name") or r.get("device") or "-"),
             "measured" if r.get("verdict") is None else str(r["verdict"]),
             "-" if r.get("ratio") is None else f"{r['ratio']:.3f}",
             "-" if r.get("ci_low") is None else f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", r["id"][:8])
            for r in recs]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    for r in (head, tuple("-" * w for w in widths), *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0
