"""`meshcast user|flood|status --token-file FILE` and $MESHCAST_TOKEN (client_token)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshcast.client.cli import TOKEN_ENV, client_token
from meshcast.errors import ConfigError

SECRET = "0123456789abcdef0123"


def token_file(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize(
    "text",
    [
        f"{SECRET}\n",
        f"# my token\n\n{SECRET}\n",
        f"readers {SECRET}\nwriters other-secret-0123456\n",  # a line of the daemon's file
    ],
)
def test_the_first_line_gives_the_secret(tmp_path: Path, text: str) -> None:
    assert client_token(token_file(tmp_path / "t", text)) == SECRET


def test_the_environment_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert client_token(None) is None
    monkeypatch.setenv(TOKEN_ENV, SECRET)
    assert client_token(None) == SECRET


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        (f"{SECRET}\n", 0o644, "mode 0644"),
        ("# only a comment\n", 0o600, "holds no line SECRET or NAME SECRET"),
        (f"a b {SECRET}\n", 0o600, "holds no line SECRET or NAME SECRET"),
    ],
)
def test_bad_token_files_are_refused(tmp_path: Path, text: str, mode: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        client_token(token_file(tmp_path / "t", text, mode))
    assert info.value.key == "--token-file"
    assert SECRET not in str(info.value)
