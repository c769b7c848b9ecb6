"""`fluxlab data sample|shapes|validate`: sample data, synthetic shapes, dataset validation."""

from __future__ import annotations

import json


def add(sub) -> None:
    p = sub.add_parser("data", help="sample data, synthetic shapes, dataset validation")
    s = p.add_subparsers(dest="data_cmd", required=True)
    a = s.add_parser("sample", help="copy captioned photos from scikit-image into DIR")
    a.add_argument("dir")
    b = s.add_parser("shapes", help="generate a deterministic coloured-shapes dataset")
    b.add_argument("dir")
    b.add_argument("--n", type=int, default=64)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--size", type=int, default=64)
    b.add_argument("--aspect-every", type=int, default=0, metavar="K",
                   help="make every K-th image 2:3 or 3:2 to exercise aspect buckets (0: all square)")
    v = s.add_parser("validate", help="check image/caption pairs and report statistics")
    v.add_argument("dir")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    for q in (a, b, v):
        q.set_defaults(func=run)


def run(args) -> int:
    from fluxlab import data

    if args.data_cmd == "sample":
        path = data.make_sample_dataset(args.dir)
        print(f"sample dataset written to {path}")
        return 0
    if args.data_cmd == "shapes":
        path = data.make_shapes_dataset(args.dir, n=args.n, seed=args.seed, size=args.size,
                                        aspect_every=getattr(args, "aspect_every", 0))
        print(f"{args.n} shapes images written to {path}")
        return 0
    report = data.validate_dataset(args.dir)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1
