"""`fluxlab` command line: parses arguments and calls the modules. No logic lives here.

Command groups live in `fluxlab/commands/` (one module each, owning its argparse). Handlers
import their module lazily so `fluxlab doctor` does not pay for importing diffusers.
"""

from __future__ import annotations

import argparse
import os
import sys

from fluxlab.commands import UserError, bench, cache, data, doctor, generate, model, notebook, results, tiny, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in (doctor.add, tiny.add, model.add, generate.add, data.add, train.add, cache.add,
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
