"""Packaging: environment.yml and pyproject.toml must name the same dependencies."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_reqs() -> set[str]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"])
    for extra in proj["optional-dependencies"].values():
        reqs += extra
    return {r.replace(" ", "") for r in reqs}


def _conda_reqs() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {r.replace(" ", "") for r in pip if not r.startswith("-e")}


def test_environment_yml_matches_pyproject():
    py, conda = _pyproject_reqs(), _conda_reqs()
    assert {_name(r) for r in py} == {_name(r) for r in conda}, (
        f"only in pyproject: {sorted({_name(r) for r in py} - {_name(r) for r in conda})}; "
        f"only in environment.yml: {sorted({_name(r) for r in conda} - {_name(r) for r in py})}")
    # Same version bounds too, so a conda user gets what pip users get.
    assert py == conda, f"bounds differ: {sorted(py ^ conda)}"


def test_torch_floor_is_2_11():
    assert "torch>=2.11" in _pyproject_reqs()


def test_console_script_declared():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert proj["scripts"]["fluxlab"] == "fluxlab.cli:main"
    assert {"dev", "quant"} <= set(proj["optional-dependencies"])
