"""Replicated files on disk: hashing a file into its manifest, and the daemon's `ChunkStore`.

Every read and write is positioned (`os.pread`/`os.pwrite`/`os.preadv` into one reused
buffer), so memory stays bounded whatever the file size: no call ever reads a whole file.
Layout, durability and the index of complete files: docs/design/replicate.md, "Files on
disk".
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import blake3

from meshcast.errors import BlobUnavailable, IntegrityError, UsageError
from meshcast.replicate.manifest import Manifest, chunk_size_for
from meshcast.replicate.store import ChunkStore

__all__ = [
    "BLOCK_SIZE",
    "INDEX_NAME",
    "PARTIAL_SUFFIX",
    "DiskStore",
    "StoreStats",
    "check_name",
    "hash_file",
    "partial_name",
]

_log = logging.getLogger(__name__)

BLOCK_SIZE = 8 * 1024 * 1024  # bytes read per system call when hashing
INDEX_NAME = ".meshcast-index.json"  # per destination: digests of complete files
PARTIAL_SUFFIX = ".meshcast-partial"
_INDEX_TMP = INDEX_NAME + ".tmp"
_INDEX_MAX_BYTES = 8 * 1024 * 1024  # a larger index is ignored (it is only a cache)
_INDEX_MAX_ENTRIES = 10_000
# O_NONBLOCK: opening a FIFO put in place of a file must not block the daemon (then
# refused: not a regular file); it changes nothing for regular files
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
_NAME_MAX = 255  # bytes of UTF-8: the file name limit of Linux file systems
_PARTIAL_FIXED = len(".") + len(".") + 16 + len(PARTIAL_SUFFIX)
# one hashing thread: blake3's max_threads=AUTO doubles a whole-file hash on an idle
# 2-core machine (5.9 against 3.1 GB/s, 8 MiB blocks) but slows hash_file by a third when
# the other core is busy (0.53 against 0.76 GB/s), as it is in a daemon moving a file
_HASH_THREADS = 1


def _read_blocks(fd: int, start: int, end: int, buf: bytearray) -> Iterator[memoryview]:
    """The bytes [start, end) of `fd` in blocks of len(buf), read into `buf` (each view is
    valid until the next one). Stops early at end of file."""
    view = memoryview(buf)
    offset = start
    while offset < end:
        want = min(len(buf), end - offset)
        got = 0
        while got < want:
            n = os.preadv(fd, [view[got:want]], offset + got)
            if n == 0:
                break
            got += n
        if got:
            yield view[:got]
        if got < want:
            return
        offset += got


class _ChunkHasher:
    """The hashes of the chunks of a stream of blocks (and the whole stream's, if given a
    hasher); blocks and chunks of any sizes, so memory does not depend on the chunk size."""

    def __init__(self, chunk_size: int, whole: blake3.blake3 | None = None) -> None:
        self.digests: list[bytes] = []  # of the chunks completed so far
        self.total = 0  # bytes hashed
        self._chunk_size = chunk_size
        self._whole = whole
        self._part = blake3.blake3(max_threads=_HASH_THREADS)  # the chunk in progress
        self._in_part = 0

    def update(self, block: memoryview) -> None:
        if self._whole is not None:
            self._whole.update(block)
        self.total += len(block)
        at = 0
        while at < len(block):
            n = min(self._chunk_size - self._in_part, len(block) - at)
            self._part.update(block[at : at + n])
            at += n
            self._in_part += n
            if self._in_part == self._chunk_size:
                self.digests.append(self._part.digest())
                self._part = blake3.blake3(max_threads=_HASH_THREADS)
                self._in_part = 0

    def finish(self) -> list[bytes]:
        """Every chunk's hash: the last one may be short; an empty stream is one empty
        chunk."""
        if self._in_part or not self.digests:
            self.digests.append(self._part.digest())
            self._in_part = 0
        return self.digests


def hash_file(path: str, chunk_size: int | None = None) -> Manifest:
    """The manifest of the file at `path`: every chunk's hash and the whole file's, in one
    pass over the file in blocks of BLOCK_SIZE (memory does not grow with the file). Its
    name is the path's last component; `chunk_size` defaults to
    `manifest.chunk_size_for(size)`.

    Raises BlobUnavailable if the file is missing, not a regular file, unreadable or changes
    while hashed; UsageError if it is too large to replicate."""
    fd = _open_source(path)
    try:
        before = os.fstat(fd)
        size = before.st_size
        chunk = chunk_size if chunk_size is not None else chunk_size_for(size)
        if chunk <= 0:
            raise UsageError(f"chunk size must be positive, not {chunk}")
        buf = bytearray(BLOCK_SIZE)
        whole = blake3.blake3(max_threads=_HASH_THREADS)
        chunks = _ChunkHasher(chunk, whole)
        try:
            for block in _read_blocks(fd, 0, size, buf):
                chunks.update(block)
            after = os.fstat(fd)
        except OSError as exc:
            raise BlobUnavailable(f"{path}: cannot read: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if chunks.total != size or (after.st_size, after.st_mtime_ns) != (size, before.st_mtime_ns):
        raise BlobUnavailable(f"{path}: changed while it was being hashed")
    hashes = chunks.finish()
    return Manifest(
        name=os.path.basename(path),
        size=size,
        chunk_size=chunk,
        chunk_hashes=tuple(hashes),
        digest=whole.digest(),
    )


def _open_source(path: str) -> int:
    """A read-only descriptor of the regular file at `path` (a local, trusted path)."""
    try:
        fd = os.open(path, _READ)
    except FileNotFoundError as exc:
        raise BlobUnavailable(f"{path}: no such file") from exc
    except PermissionError as exc:
        raise BlobUnavailable(f"{path}: permission denied") from exc
    except OSError as exc:
        raise BlobUnavailable(f"{path}: cannot open: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BlobUnavailable(f"{path}: not a regular file")
    return fd


def check_name(name: str) -> None:
    """Raise BlobUnavailable unless `name` (from the network) is a plain file name: no
    '/', no NUL, not '.' or '..', at most 255 bytes of UTF-8, none of the store's own."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise BlobUnavailable(f"bad file name {name!r}: not a plain file name")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BlobUnavailable(f"bad file name {name!r}: not valid UTF-8") from exc
    if len(encoded) > _NAME_MAX:
        raise BlobUnavailable(f"bad file name {name[:40]!r}...: longer than {_NAME_MAX} bytes")
    if name in (INDEX_NAME, _INDEX_TMP) or name.endswith(PARTIAL_SUFFIX):
        raise BlobUnavailable(f"bad file name {name!r}: reserved for meshcast's own files")


def partial_name(name: str, digest: bytes) -> str:
    """`.<name>.<digest hex 16>.meshcast-partial`, the name cut (at a character) so the
    whole stays within 255 bytes."""
    room = _NAME_MAX - _PARTIAL_FIXED
    short = name.encode("utf-8")[:room].decode("utf-8", "ignore")
    return f".{short}.{digest.hex()[:16]}{PARTIAL_SUFFIX}"


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters of a DiskStore since it was created."""

    files_begun: int  # begin() calls that opened a file
    files_already_complete: int  # begin() found the complete file in place
    index_hits: int  # ... and knew its digest from the index, without hashing it
    chunks_resumed: int  # chunks found held in partial files by begin()
    chunks_written: int
    bytes_written: int
    chunks_read: int
    bytes_read: int
    bytes_hashed: int  # read back to hash: resume, complete files, finalize
    files_finalized: int
    integrity_failures: int  # finalize() found the whole file's digest wrong


@dataclass(slots=True, eq=False)
class _Open:
    """One open replication: the state of one digest (touched by one call at a time)."""

    manifest: Manifest
    fd: int
    dir_fd: int  # the destination directory; -1 for a source
    path: str  # the source file, or the destination directory
    partial: str  # the partial file's name in the directory; "" once complete or a source
    held: bytearray  # held[i] == 1: chunk i is on disk and verified
    missing: int  # chunks not held
    finalizing: bool = False  # finalize() is running (in a worker thread)
    closed: bool = False  # close() came: the last of close() and finalize() closes the fds

    def close_fds(self) -> None:
        os.close(self.fd)
        if self.dir_fd >= 0:
            os.close(self.dir_fd)

    def final_path(self) -> str:
        if self.dir_fd < 0:
            return self.path
        return os.path.join(self.path, self.manifest.name)


class DiskStore(ChunkStore):
    """The daemon's files: sources read in place, received files written to a partial file
    and renamed into place once verified (docs/design/replicate.md, "Files on disk").

    `root` is the default destination directory (created 0o700 when missing). A `dest`
    given to `begin` must resolve, symlinks followed, inside `root` or one of
    `allowed_dest`; a relative `dest` is taken under `root`. Local users who can write into
    those directories are trusted: the checks keep out names and destinations from the
    network, not a local attacker racing the daemon.

    Threads: every method may run in any thread, concurrently with calls for other digests:
    a lock guards the table of open files and the counters, another each directory's index.
    For one digest, `read` and `write` may run while `finalize` does (a node forwards what
    it holds while its copy is checked), and `close` during `finalize` defers closing the
    files to its end; other calls for one digest must not overlap (the caller's to ensure).
    """

    def __init__(self, root: Path, allowed_dest: Sequence[Path] = ()) -> None:
        try:
            _make_directories(root)
        except OSError as exc:
            raise BlobUnavailable(f"{root}: cannot create: {exc.strerror}") from exc
        self._root = root.resolve()
        self._roots = (self._root, *(Path(p).resolve() for p in allowed_dest))
        self._lock = threading.Lock()  # the table of open files and the counters
        self._index_lock = threading.Lock()  # read-modify-write of the directories' indexes
        self._open: dict[bytes, _Open] = {}
        self._buffers = 0  # bytes of hashing buffers in use
        self._files_begun = 0
        self._files_already_complete = 0
        self._index_hits = 0
        self._chunks_resumed = 0
        self._chunks_written = 0
        self._bytes_written = 0
        self._chunks_read = 0
        self._bytes_read = 0
        self._bytes_hashed = 0
        self._files_finalized = 0
        self._integrity_failures = 0

    @property
    def root(self) -> Path:
        return self._root

    # -- ChunkStore

    def open_source(self, manifest: Manifest, path: str) -> None:
        fd = _open_source(path)
        if os.fstat(fd).st_size != manifest.size:
            os.close(fd)
            raise BlobUnavailable(f"{path}: changed since it was hashed (size differs)")
        entry = _Open(manifest, fd, -1, path, "", bytearray(b"\1") * manifest.chunk_count, 0)
        self._register(entry)

    def begin(self, manifest: Manifest, dest: str | None) -> set[int]:
        check_name(manifest.name)
        directory = self._destination(dest)
        with self._lock:
            current = self._open.get(manifest.digest)
        if current is not None:
            if current.dir_fd >= 0 and (current.path, current.manifest) == (directory, manifest):
                return _indices(current.held)
            raise UsageError(f"file {manifest.digest.hex()[:16]} is already open")
        dir_fd = _open_directory(directory)
        try:
            entry = self._open_complete(manifest, directory, dir_fd)
            if entry is None:
                entry = self._open_partial(manifest, directory, dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        self._register(entry)
        with self._lock:
            self._files_begun += 1
        return _indices(entry.held)

    def read(self, digest: bytes, index: int) -> bytes:
        entry = self._entry(digest)
        length = self._check_index(entry, index)
        if not entry.held[index]:
            raise UsageError(f"chunk {index} of {entry.final_path()} is not held")
        offset = entry.manifest.chunk_offset(index)
        parts: list[bytes] = []
        got = 0
        try:
            while got < length:
                part = os.pread(entry.fd, length - got, offset + got)
                if not part:
                    raise BlobUnavailable(f"{entry.final_path()}: shorter than its manifest")
                parts.append(part)
                got += len(part)
        except OSError as exc:
            raise BlobUnavailable(f"{entry.final_path()}: cannot read: {exc.strerror}") from exc
        with self._lock:
            self._chunks_read += 1
            self._bytes_read += length
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, digest: bytes, index: int, data: bytes | memoryview) -> None:
        entry = self._entry(digest)
        length = self._check_index(entry, index)
        if entry.dir_fd < 0:
            raise UsageError(f"{entry.path} is a source: its chunks cannot be written")
        if len(data) != length:
            raise UsageError(f"chunk {index} is {length} bytes, not {len(data)}")
        if entry.held[index]:
            return
        view = memoryview(data)
        offset = entry.manifest.chunk_offset(index)
        done = 0
        try:
            while done < length:
                wrote = os.pwrite(entry.fd, view[done:], offset + done)
                if wrote == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += wrote
        except OSError as exc:
            raise _write_error(entry.path, exc) from exc
        entry.held[index] = 1
        entry.missing -= 1
        with self._lock:
            self._chunks_written += 1
            self._bytes_written += length

    def finalize(self, digest: bytes) -> str:
        entry = self._entry(digest)
        if entry.dir_fd < 0 or not entry.partial:
            return entry.final_path()  # a source, or complete at begin
        with self._lock:
            if entry.finalizing:
                raise UsageError(f"{entry.final_path()}: already being finalized")
            entry.finalizing = True
        try:
            return self._finalize(entry)
        finally:
            with self._lock:
                entry.finalizing = False
                release = entry.closed
            if release:
                entry.close_fds()

    def _finalize(self, entry: _Open) -> str:
        if entry.missing:
            raise UsageError(f"{entry.final_path()}: {entry.missing} chunks not written yet")
        manifest = entry.manifest
        try:
            os.fsync(entry.fd)
            if os.fstat(entry.fd).st_size != manifest.size:
                raise IntegrityError(
                    f"{os.path.join(entry.path, entry.partial)}: not {manifest.size} bytes:"
                    " changed on disk while received"
                )
            found = self._digest(entry.fd, manifest.size)
        except OSError as exc:
            raise BlobUnavailable(f"{entry.final_path()}: cannot read: {exc.strerror}") from exc
        if found != manifest.digest:
            with self._lock:
                self._integrity_failures += 1
            try:  # which chunks are bad: they are fetched again
                entry.held = self._held_chunks(entry.fd, manifest, manifest.size)
            except OSError as exc:
                entry.held = bytearray(manifest.chunk_count)
                _log.warning("%s: cannot re-read: %s", entry.final_path(), exc.strerror)
            entry.missing = entry.held.count(0)
            bad = tuple(i for i, held in enumerate(entry.held) if not held)
            raise IntegrityError(
                f"{os.path.join(entry.path, entry.partial)}: BLAKE3 {found.hex()} is not the"
                f" manifest's {manifest.digest.hex()}; bad chunks: {list(bad[:10])}",
                bad,
            )
        try:
            os.replace(
                entry.partial, manifest.name, src_dir_fd=entry.dir_fd, dst_dir_fd=entry.dir_fd
            )
            os.fsync(entry.dir_fd)
            done = os.fstat(entry.fd)
        except OSError as exc:
            raise BlobUnavailable(
                f"{entry.final_path()}: cannot put in place: {exc.strerror}"
            ) from exc
        entry.partial = ""
        self._index_put(entry.dir_fd, entry.path, manifest.name, done, manifest.digest)
        with self._lock:
            self._files_finalized += 1
        return entry.final_path()

    def close(self, digest: bytes) -> None:
        with self._lock:
            entry = self._open.pop(digest, None)
            if entry is None:
                return
            entry.closed = True
            if entry.finalizing:
                return  # a descriptor closed under finalize could be reused: it closes them
        entry.close_fds()

    def memory(self) -> int:
        with self._lock:
            return self._buffers + sum(len(entry.held) for entry in self._open.values())

    # -- more than a ChunkStore

    def close_all(self) -> None:
        """Close every open replication (partial files stay for a later resume)."""
        with self._lock:
            digests = list(self._open)
        for digest in digests:
            self.close(digest)

    def statistics(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                files_begun=self._files_begun,
                files_already_complete=self._files_already_complete,
                index_hits=self._index_hits,
                chunks_resumed=self._chunks_resumed,
                chunks_written=self._chunks_written,
                bytes_written=self._bytes_written,
                chunks_read=self._chunks_read,
                bytes_read=self._bytes_read,
                bytes_hashed=self._bytes_hashed,
                files_finalized=self._files_finalized,
                integrity_failures=self._integrity_failures,
            )

    # -- opening

    def _entry(self, digest: bytes) -> _Open:
        with self._lock:
            entry = self._open.get(digest)
        if entry is None:
            raise UsageError(f"file {digest.hex()[:16]} is not open")
        return entry

    @staticmethod
    def _check_index(entry: _Open, index: int) -> int:
        """The length of chunk `index`, or UsageError when out of range."""
        if not 0 <= index < entry.manifest.chunk_count:
            raise UsageError(
                f"chunk {index} out of range: {entry.final_path()} has"
                f" {entry.manifest.chunk_count} chunks"
            )
        return entry.manifest.chunk_length(index)

    def _register(self, entry: _Open) -> None:
        with self._lock:
            if entry.manifest.digest not in self._open:
                self._open[entry.manifest.digest] = entry
                return
        entry.close_fds()
        raise UsageError(f"file {entry.manifest.digest.hex()[:16]} is already open")

    def _destination(self, dest: str | None) -> str:
        """The resolved destination directory (created when missing), or BlobUnavailable."""
        if dest is None:
            path = self._root
        else:
            if not dest or "\0" in dest:
                raise BlobUnavailable(f"bad destination directory {dest!r}")
            try:
                path = (self._root / dest).resolve()  # an absolute dest replaces the root
            except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (3.11)
                raise BlobUnavailable(f"bad destination directory {dest!r}: {exc}") from exc
        if not any(path == root or root in path.parents for root in self._roots):
            allowed = ", ".join(str(root) for root in self._roots)
            raise BlobUnavailable(
                f"destination {dest!r} ({path}) is outside the allowed directories: {allowed}"
            )
        try:
            _make_directories(path)
        except FileExistsError as exc:
            raise BlobUnavailable(f"destination {path}: not a directory") from exc
        except OSError as exc:
            raise BlobUnavailable(f"destination {path}: cannot create: {exc.strerror}") from exc
        return str(path)

    def _open_complete(self, manifest: Manifest, directory: str, dir_fd: int) -> _Open | None:
        """The entry of the final file if it is already in place with the manifest's digest."""
        name = manifest.name
        try:
            fd = os.open(name, _READ | os.O_NOFOLLOW, dir_fd=dir_fd)
        except OSError:
            return None  # missing, a symbolic link, unreadable: received anew
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != manifest.size:
                os.close(fd)
                return None
            found = self._index_get(dir_fd, name, st)
            if found is None:
                found = self._digest(fd, manifest.size)
                self._index_put(dir_fd, directory, name, st, found)
            elif found == manifest.digest:
                with self._lock:
                    self._index_hits += 1
        except OSError:
            os.close(fd)
            return None
        if found != manifest.digest:
            os.close(fd)
            return None
        with self._lock:
            self._files_already_complete += 1
        stale = partial_name(name, manifest.digest)
        try:
            os.unlink(stale, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.warning("%s: cannot remove stale partial file: %s", directory, exc.strerror)
        held = bytearray(b"\1") * manifest.chunk_count
        return _Open(manifest, fd, dir_fd, directory, "", held, 0)

    def _open_partial(self, manifest: Manifest, directory: str, dir_fd: int) -> _Open:
        """The entry of the partial file, created or resumed (its held chunks re-hashed)."""
        name = partial_name(manifest.name, manifest.digest)
        flags = os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
        where = os.path.join(directory, name)
        created = True
        try:
            try:
                fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
            except FileExistsError:
                created = False
                fd = os.open(name, flags, dir_fd=dir_fd)
        except OSError as exc:
            raise BlobUnavailable(f"{where}: cannot open: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BlobUnavailable(f"{where}: not a regular file")
            if created:
                held = bytearray(manifest.chunk_count)
            else:
                held = self._held_chunks(fd, manifest, min(st.st_size, manifest.size))
                if st.st_size > manifest.size:
                    os.ftruncate(fd, manifest.size)
            _preallocate(fd, manifest.size, where)
        except BaseException as exc:
            os.close(fd)
            if created:
                with suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)
            if isinstance(exc, OSError):
                raise BlobUnavailable(f"{where}: {exc.strerror}") from exc
            raise
        resumed = held.count(1)
        with self._lock:
            self._chunks_resumed += resumed
        return _Open(manifest, fd, dir_fd, directory, name, held, manifest.chunk_count - resumed)

    # -- hashing

    def _digest(self, fd: int, size: int) -> bytes:
        """BLAKE3 of the first `size` bytes of `fd` (fewer if the file is shorter)."""
        hasher = blake3.blake3(max_threads=_HASH_THREADS)
        with self._buffer(BLOCK_SIZE) as buf:
            for block in _read_blocks(fd, 0, size, buf):
                hasher.update(block)
                self._count_hashed(len(block))
        return hasher.digest()

    def _held_chunks(self, fd: int, manifest: Manifest, length: int) -> bytearray:
        """held[i] == 1 for each chunk within the first `length` bytes of `fd` that matches
        its hash."""
        held = bytearray(manifest.chunk_count)
        chunks = _ChunkHasher(manifest.chunk_size)
        with self._buffer(BLOCK_SIZE) as buf:
            for block in _read_blocks(fd, 0, length, buf):
                chunks.update(block)
                self._count_hashed(len(block))
        # the chunks entirely within `length` (a partial file may be short)
        complete = (
            manifest.chunk_count if length == manifest.size else length // manifest.chunk_size
        )
        for index, digest in enumerate(chunks.finish()[:complete]):
            held[index] = digest == manifest.chunk_hashes[index]
        return held

    def _count_hashed(self, n: int) -> None:
        with self._lock:
            self._bytes_hashed += n

    @contextmanager
    def _buffer(self, size: int) -> Iterator[bytearray]:
        """A hashing buffer, counted in `memory()` while in use."""
        with self._lock:
            self._buffers += size
        try:
            yield bytearray(size)
        finally:
            with self._lock:
                self._buffers -= size

    # -- the index of complete files

    def _index_get(self, dir_fd: int, name: str, st: os.stat_result) -> bytes | None:
        with self._index_lock:
            entry = _index_load(dir_fd).get(name)
        if entry is None or entry.get("key") != _stat_key(st):
            return None
        try:
            return bytes.fromhex(str(entry["digest"]))
        except (KeyError, ValueError):
            return None

    def _index_put(
        self, dir_fd: int, directory: str, name: str, st: os.stat_result, digest: bytes
    ) -> None:
        """Record that `name` (as `st` describes it) has `digest`; drop stale entries. The
        index is a cache: failing to write it costs a re-hash later, nothing else."""
        with self._index_lock:
            files = _index_load(dir_fd)
            files[name] = {"key": _stat_key(st), "digest": digest.hex()}
            kept = {
                other: entry
                for other, entry in files.items()
                if other == name or entry.get("key") == _stat_key_at(dir_fd, other)
            }
            while len(kept) > _INDEX_MAX_ENTRIES:
                del kept[next(iter(kept))]
            try:
                _index_store(dir_fd, kept)
            except OSError as exc:
                _log.warning("%s: cannot write %s: %s", directory, INDEX_NAME, exc.strerror)


def _indices(held: bytearray) -> set[int]:
    return {index for index, flag in enumerate(held) if flag}


def _make_directories(path: Path) -> None:
    """`mkdir -p -m 0700`: unlike Path.mkdir(parents=True), every directory created is 0700."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)


def _open_directory(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise BlobUnavailable(f"destination {path}: cannot open: {exc.strerror}") from exc


def _preallocate(fd: int, size: int, where: str) -> None:
    """Size the partial file (sparse) after checking the file system has room for it, so a
    full disk shows at begin and not mid-transfer (unless something else fills it
    meanwhile: then a write fails with BlobUnavailable). Not posix_fallocate: on ext4 every
    later write into its unwritten extents costs ~10x (360 MB/s against 3.4 GB/s for 256 KiB
    pwrites on the development VM), CPU the daemon needs for the transfer itself."""
    st = os.fstat(fd)
    missing = size - st.st_blocks * 512  # what a resumed partial file does not hold yet
    if missing > 0:
        fs = os.fstatvfs(fd)
        if fs.f_bavail * fs.f_frsize < missing:
            raise BlobUnavailable(
                f"{where}: no space for {size} bytes ({fs.f_bavail * fs.f_frsize} free)"
            )
    os.ftruncate(fd, size)


def _write_error(directory: str, exc: OSError) -> BlobUnavailable:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BlobUnavailable(f"{directory}: no space left")
    return BlobUnavailable(f"{directory}: cannot write: {exc.strerror}")


def _stat_key(st: os.stat_result) -> list[int]:
    """What must not change for an index entry to hold: size, mtime, inode, ctime."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _stat_key_at(dir_fd: int, name: str) -> list[int] | None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    return _stat_key(st) if stat.S_ISREG(st.st_mode) else None


def _index_load(dir_fd: int) -> dict[str, dict[str, object]]:
    """The directory's index (name -> {"key": stat key, "digest": hex}); {} when missing or
    unreadable (it is a cache)."""
    try:
        fd = os.open(INDEX_NAME, _READ | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError:
        return {}
    try:
        raw = os.read(fd, _INDEX_MAX_BYTES + 1)
    except OSError:
        return {}
    finally:
        os.close(fd)
    if len(raw) > _INDEX_MAX_BYTES:
        return {}
    try:
        loaded = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    files = loaded.get("files") if isinstance(loaded, dict) else None
    if not isinstance(files, dict):
        return {}
    return {
        name: entry
        for name, entry in files.items()
        if isinstance(name, str) and isinstance(entry, dict)
    }


def _index_store(dir_fd: int, files: dict[str, dict[str, object]]) -> None:
    data = json.dumps({"version": 1, "files": files}, separators=(",", ":")).encode()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(_INDEX_TMP, flags, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(_INDEX_TMP, INDEX_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
