"""One module per `fluxlab` command group, each owning its argparse and its handler.

Every module has `add(sub)`, which adds its parser to the `fluxlab` subparsers; `fluxlab.cli`
builds the whole parser from them. Handlers import their domain module lazily so that
`fluxlab doctor` does not pay for importing diffusers.
"""

from __future__ import annotations


from fluxlab.errors import UserError  # noqa: F401  (re-exported: commands raise it)


def parse_pairs(values: list[str] | None) -> dict[str, str]:
    """Parse repeated `--set key=value` / `-p key=value` into a dict, refusing malformed pairs."""
    out: dict[str, str] = {}
    for item in values or []:
        if "=" not in item:
            raise UserError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out
