"""`fluxlab notebook run | run-all | sweep`: parameterized notebooks through papermill."""

from __future__ import annotations

import sys

from fluxlab.commands import parse_pairs


def add(sub) -> None:
    p = sub.add_parser("notebook", help="run parameterized notebooks through papermill")
    s = p.add_subparsers(dest="nb_cmd", required=True)
    r = s.add_parser("run", help="run one notebook")
    r.add_argument("name")
    r.add_argument("--preset", default="ci", choices=["ci", "full"])
    r.add_argument("-p", action="append", dest="params", metavar="KEY=VALUE")
    a = s.add_parser("run-all", help="run every notebook and print the verdict table")
    a.add_argument("--preset", default="ci", choices=["ci", "full"])
    w = s.add_parser("sweep", help="run a parameter grid")
    w.add_argument("name")
    w.add_argument("--preset", default="ci", choices=["ci", "full"])
    w.add_argument("-p", action="append", dest="params", metavar="KEY=V1,V2")
    w.add_argument("--workers", type=int, default=1)
    w.add_argument("--force", action="store_true")
    for q in (r, a, w):
        q.add_argument("--runs-dir", default="runs", help="where executed notebooks are written (default: runs)")
        q.add_argument("--timeout", type=float, default=None, help="seconds one cell may run (default: no limit)")
        q.set_defaults(func=run)


def run(args) -> int:
    from fluxlab import notebook, sweeps
    from fluxlab.tables import verdict_table

    runs_dir = getattr(args, "runs_dir", None) or "runs"
    timeout = getattr(args, "timeout", None)
    if args.nb_cmd == "run":
        res = notebook.run(args.name, args.preset, parse_pairs(args.params), runs_dir=runs_dir, timeout=timeout)
        print(verdict_table(res.records, [res]))
        print(f"{'ok' if res.ok else 'FAILED'} in {res.seconds:.1f}s: {res.output}")
        if not res.ok:
            print(f"error: {res.error}", file=sys.stderr)
        return 0 if res.ok else 1
    if args.nb_cmd == "run-all":
        results = []
        for name in notebook.run_all_names(args.preset):
            res = notebook.run(name, args.preset, runs_dir=runs_dir, timeout=timeout)
            print(f"{'ok' if res.ok else 'FAILED':<6} {res.seconds:>6.1f}s  {name}  -> {res.output}"
                  + (f"\n       error: {res.error}" if not res.ok else ""), flush=True)
            results.append(res)
        print()
        print(verdict_table([r for res in results for r in res.records], results))
        return 0 if all(r.ok for r in results) else 1
    if args.nb_cmd == "sweep":
        grid = {k: notebook.split_values(v) for k, v in parse_pairs(args.params).items()}
        results = sweeps.sweep(args.name, args.preset, grid, workers=args.workers, force=args.force,
                               runs_dir=runs_dir, timeout=timeout,
                               on_cell=lambda r: print(f"{r.status:<7} {r.key}", flush=True))
        print(sweeps.sweep_summary(results))
        return 0 if all(r.status != "failed" for r in results) else 1
    raise ValueError(f"unknown notebook command {args.nb_cmd!r}")
