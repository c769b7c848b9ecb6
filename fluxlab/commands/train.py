"""`fluxlab train` and `fluxlab lr-find`: train a LoRA from a YAML config, or run the
learning-rate range test (the handlers, with their exit codes, are in fluxlab/training/run.py)."""

from __future__ import annotations

from fluxlab.commands import parse_pairs


def add(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA from a YAML config")
    p.add_argument("config")
    p.add_argument("--set", action="append", dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an output_dir that holds an earlier one: the old run is moved "
                        "aside to <output_dir>.replaced-<time>, never deleted")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="write a torch.profiler trace of N steps after warm-up")
    p.set_defaults(func=run_train)

    f = sub.add_parser("lr-find", help="learning-rate range test")
    f.add_argument("config")
    f.add_argument("--set", action="append", dest="overrides", metavar="KEY=VALUE")
    f.set_defaults(func=run_lr_find)


def run_train(a) -> int:
    from fluxlab.training import run

    return run.cli_train(a.config, parse_pairs(a.overrides), resume=a.resume, profile=a.profile,
                         overwrite=a.overwrite)


def run_lr_find(a) -> int:
    from fluxlab.training import run

    return run.cli_lr_find(a.config, parse_pairs(a.overrides))
