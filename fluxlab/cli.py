"""`fluxlab` command line: parses arguments and calls the modules. No logic lives here.

Command groups live in `fluxlab/commands/` (one module each, owning its argparse); data, train,
lr-find and cache are still here until the trainer split. Handlers import their module lazily
so `fluxlab doctor` does not pay for importing diffusers.
"""

from __future__ import annotations

import argparse
import os
import sys

from fluxlab.commands import UserError, bench, doctor, generate, notebook, parse_pairs, results, tiny  # noqa: F401


# --- data -------------------------------------------------------------------
def _add_data(sub) -> None:
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

    def run(args):
        from fluxlab import data

        return data.cli(args)

    for q in (a, b, v):
        q.set_defaults(func=run)


# --- train / lr-find --------------------------------------------------------
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA from a YAML config")
    p.add_argument("config")
    p.add_argument("--set", action="append", dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an output_dir that holds an earlier one: the old run is moved "
                        "aside to <output_dir>.replaced-<time>, never deleted")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="write a torch.profiler trace of N steps after warm-up")

    def run(a):
        from fluxlab import trainer

        return trainer.cli_train(a.config, parse_pairs(a.overrides), resume=a.resume, profile=a.profile,
                                 overwrite=a.overwrite)

    p.set_defaults(func=run)

    f = sub.add_parser("lr-find", help="learning-rate range test")
    f.add_argument("config")
    f.add_argument("--set", action="append", dest="overrides", metavar="KEY=VALUE")

    def run_lr(a):
        from fluxlab import trainer

        return trainer.cli_lr_find(a.config, parse_pairs(a.overrides))

    f.set_defaults(func=run_lr)


# --- cache ------------------------------------------------------------------
def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="latent / text-embedding / position-id caches")
    s = p.add_subparsers(dest="cache_cmd", required=True)
    b = s.add_parser("build", help="fill the caches for a training config")
    b.add_argument("config")
    b.add_argument("--set", action="append", dest="overrides", metavar="KEY=VALUE")
    b.add_argument("--json", action="store_true")
    st = s.add_parser("stats", help="print cache sizes and counters")
    ve = s.add_parser("verify", help="check every entry; evict corrupt ones")
    for q in (st, ve):
        q.add_argument("cache_dir", nargs="?", default=None,
                       help="the cache folder (default: the one `train` uses, $FLUXLAB_HOME/cache)")

    def run(a):
        from fluxlab import caches

        if a.cache_cmd != "build" and a.cache_dir is None:
            from fluxlab.config import default_cache_dir

            a.cache_dir = str(default_cache_dir())
        if a.cache_cmd == "build":
            return caches.cli_build(a.config, parse_pairs(a.overrides), as_json=a.json)
        if a.cache_cmd == "stats":
            return caches.cli_stats(a.cache_dir)
        return caches.cli_verify(a.cache_dir)

    for q in (b, st, ve):
        q.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in (doctor.add, tiny.add, generate.add, _add_data, _add_train, _add_cache,
                results.add, notebook.add, bench.add):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except BrokenPipeError:
        # `fluxlab results list | head`: the reader left early, which is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        # Ctrl-C outside the trainer's own handling (imports, start-up): no traceback; 128 + SIGINT.
        print("fluxlab: interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError) as e:
        # User-fixable problems (and paths the user gave that do not exist): one clear line, no
        # traceback. Anything else is a fluxlab bug and keeps its traceback.
        print(f"fluxlab: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
