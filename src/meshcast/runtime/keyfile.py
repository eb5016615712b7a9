"""Cluster key files on disk: read with their permissions checked, written with mode 0600.

The text format and the key ring are `meshcast.wire.keys` (no I/O there). A key file must
be a regular file that only its owner can read or write: a key others can read is no
secret, so a file with any group or world permission bit is refused, with the ``chmod``
that fixes it. Every error is a `ConfigError` whose source is the file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from meshcast.config import SecurityConfig
from meshcast.errors import ConfigError, ConfigProblem
from meshcast.wire.keys import KEY_SIZE, ClusterKey, KeyRing, format_key, parse_key

MAX_KEY_FILE_BYTES = 64 * 1024  # a key file is one line and comments; more is not one
_OWNER_ONLY = 0o600


def new_key() -> ClusterKey:
    """A fresh random cluster key."""
    return ClusterKey(secrets.token_bytes(KEY_SIZE))


def read_key_file(path: str | os.PathLike[str]) -> ClusterKey:
    """The key in the file at `path`.

    Raises `ConfigError` naming the file when it does not exist, is not a regular file,
    has group or world permission bits set, or does not hold exactly one valid key.
    """
    source = os.fspath(path)
    # Open first, then check what was opened (fstat): no window between check and read.
    # O_NONBLOCK: opening a FIFO put where the key should be must not hang the daemon.
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(
            f"the key file does not exist (create one with `meshcast keygen {source}`)",
            source=source,
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot open the key file: {exc.strerror or exc}", source=source
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("the key file is not a regular file", source=source)
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise ConfigError(
                f"the key file can be read or written by others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); a cluster key must be private: "
                f"run `chmod 600 {source}`",
                source=source,
            )
        data = b""
        while len(data) <= MAX_KEY_FILE_BYTES:
            chunk = os.read(fd, MAX_KEY_FILE_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise ConfigError(
            f"cannot read the key file: {exc.strerror or exc}", source=source
        ) from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(
            f"the key file is larger than {MAX_KEY_FILE_BYTES} bytes: not a key file",
            source=source,
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not UTF-8 text: {exc.reason} at byte {exc.start}", source=source
        ) from None
    return parse_key(text, source=source)


def write_key_file(path: str | os.PathLike[str], key: ClusterKey, *, force: bool = False) -> None:
    """Write `key` to a new file at `path`, readable and writable by its owner only.

    The file is created with mode 0600 from the start (no moment with looser
    permissions). Without `force` an existing file is never touched (`ConfigError`); with
    it, the key is written to a new file beside it that then replaces it atomically, so
    readers see the old key or the new one, never half a file.
    """
    target = Path(path)
    source = os.fspath(path)
    if not force:
        _create_with(target, format_key(key), source)
        return
    if target.exists() and not target.is_file():
        raise ConfigError("exists and is not a regular file; not replaced", source=source)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    _create_with(temporary, format_key(key), os.fspath(temporary))
    try:
        os.replace(temporary, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise ConfigError(
            f"cannot write the key file: {exc.strerror or exc}", source=source
        ) from None


def _create_with(path: Path, text: str, source: str) -> None:
    """Create `path` (it must not exist) with mode 0600 and `text` in it."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, _OWNER_ONLY)
    except FileExistsError:
        raise ConfigError(
            "the file already exists and is not overwritten (with --force, meshcast keygen "
            "replaces it: every daemon using the old key then needs the new one)",
            source=source,
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot create the key file: {exc.strerror or exc}", source=source
        ) from None
    try:
        # The umask may only have removed bits; make sure the mode is exactly 0600.
        os.fchmod(fd, _OWNER_ONLY)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            fd = -1
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise ConfigError(
            f"cannot write the key file: {exc.strerror or exc}", source=source
        ) from None


def load_keyring(security: SecurityConfig, source: str = "") -> KeyRing | None:
    """The ring of a daemon's [security] section: its key (and the next one, during a
    rotation), read from their files; None when it runs insecure.

    Raises `ConfigError` when the daemon may not start: no key and not insecure (naming
    `source`, the cluster file), or a key file that is missing, too open or bad (each
    file's problem listed).
    """
    security.check_daemon(source)
    if security.key_file is None:
        return None
    keys: list[ClusterKey] = []
    problems: list[ConfigProblem] = []
    for path in (security.key_file, security.next_key_file):
        if path is None:
            continue
        try:
            keys.append(read_key_file(path))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError.of(problems)
    return KeyRing.of(keys[0], keys[1] if len(keys) > 1 else None)


def describe_keyring(ring: KeyRing | None) -> list[dict[str, object]]:
    """The ring for logs and status: each key's role, fingerprint and key id, newest
    first (never the secret)."""
    if ring is None:
        return []
    roles = ["next", "current"] if len(ring.keys) > 1 else ["current"]
    return [
        {"role": role, "fingerprint": key.fingerprint, "key_id": key.key_id}
        for role, key in zip(roles, ring.keys, strict=True)
    ]


def default_key_path() -> Path:
    """Where the embedded cluster's key lives: one per user, made on first use."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "meshcast" / "default-cluster.key"


def ensure_key_file(path: str | os.PathLike[str]) -> ClusterKey:
    """The key in `path`, creating the file with a new key if there is none yet.

    For a key nobody configured (the embedded cluster's): several daemons may start at
    once and each may try to create it. The key is written to a private file first and
    linked into place, which fails if another got there first; every daemon then reads
    the one key that won.
    """
    target = Path(path)
    if not target.exists():
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        _create_with(temporary, format_key(new_key()), os.fspath(temporary))
        try:
            os.link(temporary, target)
        except FileExistsError:
            pass  # another daemon made it first: use that one
        except OSError as exc:
            raise ConfigError(
                f"cannot create the key file: {exc.strerror or exc}", source=os.fspath(path)
            ) from None
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink()
    return read_key_file(target)


__all__ = [
    "default_key_path",
    "describe_keyring",
    "ensure_key_file",
    "load_keyring",
    "new_key",
    "read_key_file",
    "write_key_file",
]
