"""`fluxlab doctor`: versions, device and Triton mode."""

from __future__ import annotations


def add(sub) -> None:
    p = sub.add_parser("doctor", help="print versions, device and Triton mode")

    def run(a):
        from fluxlab import env

        return env.doctor()

    p.set_defaults(func=run)
