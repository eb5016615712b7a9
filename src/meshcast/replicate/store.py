"""Where a replication's bytes live: the store the transfer engine reads and writes through.

The engine never touches files: it asks a `ChunkStore` for the chunks it sends and hands it
the chunks it received, each already verified against the `Manifest`. The daemon injects
`meshcast.runtime.blob_store.DiskStore`; the simulator injects a store in memory. A
replication is known by its file's digest (`Manifest.digest`), so every call after
`open_source`/`begin` names the digest.

Threads: the runtime calls `finalize` (which re-hashes the whole file) and may call `begin`
(which may re-hash a partial or complete file) in a worker thread, while the loop thread
keeps calling the other methods. A store therefore keeps its state per digest, and every
method may run concurrently with any call for *another* digest. For the same digest,
`read` and `write` may run while `finalize` does (a node keeps forwarding the chunks it
holds while its copy is checked), and `close` may come during `finalize` (the store then
releases the file when `finalize` ends); nothing else may overlap for one digest: the
caller serializes `begin`, `finalize` and the rest.
"""

from __future__ import annotations

from typing import Protocol

from meshcast.errors import BlobUnavailable
from meshcast.replicate.manifest import Manifest

__all__ = ["ChunkStore", "NoStore"]


class ChunkStore(Protocol):
    """The files of the replications a node takes part in (see the module docstring)."""

    def open_source(self, manifest: Manifest, path: str) -> None:
        """Serve the origin's own file at `path` (local, trusted), read-only, as the file
        `manifest` describes (hashed from it beforehand).

        Raises BlobUnavailable if the file is missing, unreadable, not a regular file or no
        longer of the manifest's size; UsageError if `manifest.digest` is already open for
        another file."""
        ...

    def begin(self, manifest: Manifest, dest: str | None) -> set[int]:
        """Start, or resume, receiving the file of `manifest` into directory `dest` (None:
        the store's default; `dest` and `manifest.name` come from the network, so the store
        checks them). Returns the indices of the chunks already held and verified: those of
        a partial file left by an earlier run (resume after a crash), or every chunk when
        the complete file with this digest is already in place under its name (a node that
        has the file receives nothing). May read the whole file: run it off the loop.

        Raises BlobUnavailable for a bad name, a missing, bad or disallowed `dest`, no
        space or an I/O failure; UsageError if the digest is already open elsewhere."""
        ...

    def read(self, digest: bytes, index: int) -> bytes:
        """Chunk `index` of an open file (the source, or a chunk held by a recipient: written,
        found on resume, or of a complete file), `manifest.chunk_length(index)` bytes.

        Raises UsageError for a digest not open or a chunk not held; BlobUnavailable when
        the file cannot be read (or shrank under the store)."""
        ...

    def write(self, digest: bytes, index: int, data: bytes | memoryview) -> None:
        """Store chunk `index`, which the caller has verified against the manifest. Writing
        a chunk already held does nothing.

        Raises UsageError for a digest not begun, an index out of range or data of the wrong
        length; BlobUnavailable on a write failure (no space)."""
        ...

    def finalize(self, digest: bytes) -> str:
        """Every chunk is written: make the file durable and put it in place. Flushes the
        file to disk, re-hashes it whole against `manifest.digest`, renames it to its final
        name (replacing atomically any other file of that name) and flushes the directory.
        Returns the final path. A file that was already complete at `begin` is returned as
        it is. Runs in a worker thread (see the module docstring).

        Raises IntegrityError on a digest mismatch, leaving no final file (the partial file
        stays, and the chunks found bad on disk are no longer held); UsageError when not
        every chunk is held; BlobUnavailable on an I/O failure."""
        ...

    def close(self, digest: bytes) -> None:
        """Forget the replication of `digest` and release its files; a partial file stays
        on disk for a later `begin` to resume. Closing a digest not open does nothing."""
        ...

    def memory(self) -> int:
        """Bytes the store holds in memory (chunk data and bookkeeping)."""
        ...


class NoStore:
    """The store of a daemon without a place for replicated files: it takes part in no
    replication (every request and offer fails with a clear reason)."""

    _REASON = "replication is not enabled on this daemon (it has no data directory)"

    def open_source(self, manifest: Manifest, path: str) -> None:
        raise BlobUnavailable(self._REASON)

    def begin(self, manifest: Manifest, dest: str | None) -> set[int]:
        raise BlobUnavailable(self._REASON)

    def read(self, digest: bytes, index: int) -> bytes:
        raise BlobUnavailable(self._REASON)

    def write(self, digest: bytes, index: int, data: bytes | memoryview) -> None:
        raise BlobUnavailable(self._REASON)

    def finalize(self, digest: bytes) -> str:
        raise BlobUnavailable(self._REASON)

    def close(self, digest: bytes) -> None:
        pass

    def memory(self) -> int:
        return 0
