"""Promises the project makes to a new user: the README's commands and CI agree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker} -->\s*```sh\n(.+?)\n```", text, re.DOTALL)
    assert match, f"README.md has no {marker} block"
    lines = match.group(1).strip().splitlines()
    assert len(lines) == 1, f"the {marker} must be one command"
    return lines[0]


def test_readme_has_exactly_two_setup_commands() -> None:
    assert "meshcast demo" in readme_command("demo-command")
    assert "pytest" in readme_command("test-command")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if not line.lstrip().startswith("#")]
    assert readme_command("test-command") in commands
