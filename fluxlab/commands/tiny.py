"""`fluxlab tiny build DIR [--family flux1|flux2-klein]`: the offline tiny pipelines."""

from __future__ import annotations

FAMILIES = ("flux1", "flux2-klein")


def add(sub) -> None:
    p = sub.add_parser("tiny", help="the offline tiny FLUX pipelines")
    s = p.add_subparsers(dest="tiny_cmd", required=True)
    b = s.add_parser("build", help="build a tiny pipeline (FluxPipeline or Flux2KleinPipeline) and save it "
                                   "with save_pretrained")
    b.add_argument("dir")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--family", choices=FAMILIES, default="flux1",
                   help="flux1: FluxPipeline (CLIP + T5); flux2-klein: Flux2KleinPipeline (Qwen3)")

    def run(a):
        if a.family == "flux2-klein":
            from fluxlab import flux2

            path = flux2.build_tiny_flux2_pipeline(a.dir, seed=a.seed)
            print(f"tiny FLUX.2 [klein] pipeline written to {path}")
        else:
            from fluxlab import models

            path = models.build_tiny_pipeline(a.dir, seed=a.seed)
            print(f"tiny FLUX pipeline written to {path}")
        return 0

    b.set_defaults(func=run)
