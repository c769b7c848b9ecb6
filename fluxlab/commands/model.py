"""`fluxlab model build DIR --preset flux1-dev-full`: a real-shape pipeline with random weights,
saved with save_pretrained, so it loads as a user's FLUX folder does."""

from __future__ import annotations


def add(sub) -> None:
    p = sub.add_parser("model", help="real-shape FLUX pipelines with random weights")
    s = p.add_subparsers(dest="model_cmd", required=True)
    b = s.add_parser("build", help="build a full-pipeline preset on a device and save it with save_pretrained")
    b.add_argument("dir")
    b.add_argument("--preset", default="flux1-dev-full", choices=["flux1-dev-full", "flux1-schnell-full"])
    b.add_argument("--device", default="cuda", help="where the weights are built (bf16 needs ~33 GB)")
    b.add_argument("--seed", type=int, default=0)

    def run(a):
        from fluxlab import models

        path = models.save_pipeline(a.preset, a.dir, a.device, seed=a.seed)
        print(f"{a.preset} pipeline written to {path}")
        return 0

    b.set_defaults(func=run)
