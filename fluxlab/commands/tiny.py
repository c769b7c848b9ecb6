"""`fluxlab tiny build DIR`: the offline tiny FLUX pipeline."""

from __future__ import annotations


def add(sub) -> None:
    p = sub.add_parser("tiny", help="the offline tiny FLUX pipeline")
    s = p.add_subparsers(dest="tiny_cmd", required=True)
    b = s.add_parser("build", help="build a tiny FluxPipeline and save it with save_pretrained")
    b.add_argument("dir")
    b.add_argument("--seed", type=int, default=0)

    def run(a):
        from fluxlab import models

        path = models.build_tiny_pipeline(a.dir, seed=a.seed)
        print(f"tiny FLUX pipeline written to {path}")
        return 0

    b.set_defaults(func=run)
