"""Key files on disk (meshcast.runtime.keyfile): mode 0600, permissions checked, no
overwriting without force, the ring of a [security] section."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshcast.config import SecurityConfig
from meshcast.errors import ConfigError
from meshcast.runtime.keyfile import (
    describe_keyring,
    ensure_key_file,
    load_keyring,
    new_key,
    read_key_file,
    write_key_file,
)
from meshcast.wire.keys import KEY_PREFIX, ClusterKey, KeyRing, format_key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        read_key_file(path)
    return str(caught.value)


def test_a_written_key_reads_back_with_mode_0600(tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "cluster.key"
    write_key_file(path, key)
    assert mode(path) == 0o600
    assert read_key_file(path) == key
    assert path.read_text(encoding="utf-8") == format_key(key)


def test_the_mode_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)  # the most permissive umask: the file must still be private
    try:
        write_key_file(tmp_path / "k", new_key())
    finally:
        os.umask(old)
    assert mode(tmp_path / "k") == 0o600


def test_new_keys_differ() -> None:
    assert len({new_key().secret for _ in range(20)}) == 20


def test_an_existing_file_is_not_overwritten_without_force(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    first, second = new_key(), new_key()
    write_key_file(path, first)
    with pytest.raises(ConfigError, match="already exists and is not overwritten") as caught:
        write_key_file(path, second)
    assert str(caught.value).startswith(f"{path}: ")
    assert read_key_file(path) == first
    write_key_file(path, second, force=True)
    assert read_key_file(path) == second
    assert mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.key"]  # no temporaries


def test_force_replaces_a_loose_file_with_a_private_one(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    path.write_text("old", encoding="utf-8")
    path.chmod(0o644)
    write_key_file(path, new_key(), force=True)
    assert mode(path) == 0o600


def test_force_does_not_replace_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        write_key_file(tmp_path, new_key(), force=True)


@pytest.mark.parametrize("loose", [0o640, 0o604, 0o620, 0o602, 0o644, 0o666, 0o610])
def test_group_or_world_permissions_are_refused_with_the_chmod_that_fixes_it(
    tmp_path: Path, loose: int
) -> None:
    path = tmp_path / "cluster.key"
    write_key_file(path, new_key())
    path.chmod(loose)
    message = error_of(path)
    assert message.startswith(f"{path}: ")
    assert f"(mode {loose:04o})" in message
    assert f"run `chmod 600 {path}`" in message
    path.chmod(0o600)
    read_key_file(path)
    path.chmod(0o400)  # read-only for its owner is private too
    read_key_file(path)


def test_a_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    message = error_of(path)
    assert message == (
        f"{path}: the key file does not exist (create one with `meshcast keygen {path}`)"
    )


def test_a_directory_or_a_fifo_is_not_a_key_file(tmp_path: Path) -> None:
    assert error_of(tmp_path) == f"{tmp_path}: the key file is not a regular file"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    assert error_of(fifo) == f"{fifo}: the key file is not a regular file"  # and no hang


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "found 0"),
        (b"hello\n", "not a meshcast key file"),
        (f"{KEY_PREFIX} abc\n".encode(), "the key is not hexadecimal"),
        (b"\xff\xfe", "not UTF-8 text"),
        (b"#" * (70 * 1024), "larger than"),
    ],
)
def test_bad_content_is_refused_naming_the_file(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "cluster.key"
    path.write_bytes(content)
    path.chmod(0o600)
    text = error_of(path)
    assert text.startswith(f"{path}: ")
    assert message in text


def test_ensure_makes_the_key_once_and_then_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "config" / "meshcast" / "default-cluster.key"
    key = ensure_key_file(path)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert ensure_key_file(path) == key
    assert sorted(p.name for p in path.parent.iterdir()) == ["default-cluster.key"]


def test_the_ring_of_a_security_section(tmp_path: Path) -> None:
    current, upcoming = new_key(), new_key()
    write_key_file(tmp_path / "a.key", current)
    write_key_file(tmp_path / "b.key", upcoming)
    assert load_keyring(SecurityConfig(insecure=True)) is None
    ring = load_keyring(SecurityConfig(key_file=str(tmp_path / "a.key")))
    assert ring == KeyRing.of(current)
    ring = load_keyring(
        SecurityConfig(key_file=str(tmp_path / "a.key"), next_key_file=str(tmp_path / "b.key"))
    )
    assert ring == KeyRing.of(current, upcoming)
    assert describe_keyring(ring) == [
        {"role": "next", "fingerprint": upcoming.fingerprint, "key_id": upcoming.key_id},
        {"role": "current", "fingerprint": current.fingerprint, "key_id": current.key_id},
    ]
    assert describe_keyring(None) == []
    assert "secret" not in repr(describe_keyring(ring))


def test_the_ring_lists_the_problems_of_both_files(tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    write_key_file(loose, ClusterKey(bytes(32)))
    loose.chmod(0o644)
    security = SecurityConfig(key_file=str(tmp_path / "absent.key"), next_key_file=str(loose))
    with pytest.raises(ConfigError) as caught:
        load_keyring(security)
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert "does not exist" in lines[0]
    assert "chmod 600" in lines[1]


def test_no_key_and_not_insecure_refuses_with_what_to_do() -> None:
    with pytest.raises(ConfigError) as caught:
        load_keyring(SecurityConfig(), "cluster.toml")
    message = str(caught.value)
    assert message.startswith("cluster.toml:security.key_file: a daemon needs a cluster key")
    assert "`meshcast keygen FILE`" in message
    assert 'key_file = "FILE"' in message
    assert "insecure = true" in message
