"""Worked examples of validating your own optimization with fluxlab (see examples/README.md)."""
