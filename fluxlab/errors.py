"""The one user-error type.

A `UserError` is a problem the user can fix: a bad path, a bad config value, a YAML syntax
error, a damaged checkpoint or store. `fluxlab` prints it as one line naming the thing and what
to do, and exits 2. Anything else is a bug in fluxlab and keeps its traceback.

Module-specific errors (ConfigError, CheckpointError, StoreError, DatasetError...) subclass it,
and keep their historical base (ValueError, RuntimeError) so callers catching those still work.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad path, bad config key...). Printed without a traceback."""


class UserFileNotFound(UserError, FileNotFoundError):
    """A path the user gave does not exist."""


def printable(text: object) -> str:
    """`text` with every non-printable character (newline, ESC, NUL...) escaped as Python writes it,
    so a hostile file name cannot forge lines or terminal colours in a report."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
