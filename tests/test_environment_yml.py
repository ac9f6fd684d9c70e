"""environment.yml mirrors pyproject.toml's dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[\[<>=!~ ;]", req.strip(), maxsplit=1)[0].lower()


def test_every_core_dependency_is_in_environment_yml() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = (ROOT / "environment.yml").read_text()
    pip_lines = [ln.strip()[2:].strip() for ln in env.splitlines() if ln.strip().startswith("- ")]
    env_reqs = {_name(r): r for r in pip_lines if not r.startswith(("-e", "python", "pip"))}
    for req in project["dependencies"]:
        assert _name(req) in env_reqs, f"{req} missing from environment.yml"
        assert env_reqs[_name(req)].replace(" ", "") == req.replace(" ", ""), (
            f"version range differs: pyproject {req!r} vs environment.yml {env_reqs[_name(req)]!r}"
        )
    assert "-e .[dev]" in env
    assert "python=3.11" in env
