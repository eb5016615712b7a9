"""What a replicated file is: its size, its chunking and the BLAKE3 hash of every chunk.

The origin computes the manifest in one pass over the file before anything is sent; every
chunk is checked against it before it is written or forwarded, and the whole file against
`digest` once complete. A file is known by its digest: a node that already holds a file
with the same digest has nothing to receive.
"""

from __future__ import annotations

from dataclasses import dataclass

import blake3

from meshcast.errors import UsageError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "HASH_SIZE",
    "MAX_CHUNKS",
    "Manifest",
    "chunk_digest",
    "chunk_size_for",
]

HASH_SIZE = 32  # BLAKE3-256
DEFAULT_CHUNK_SIZE = 256 * 1024  # bytes: the unit of verification and of fast-forwarding
MAX_CHUNKS = 65_536  # bounds a manifest (2 MiB of hashes); larger files get larger chunks
MAX_CHUNK_SIZE = 16 * 1024 * 1024


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The BLAKE3-256 hash of one chunk (the same function the manifest was built with)."""
    return blake3.blake3(data).digest()


def chunk_size_for(size: int, preferred: int = DEFAULT_CHUNK_SIZE) -> int:
    """`preferred`, doubled until a file of `size` bytes has at most MAX_CHUNKS chunks."""
    chunk = preferred
    while -(-size // chunk) > MAX_CHUNKS:
        chunk *= 2
    if chunk > MAX_CHUNK_SIZE:
        raise UsageError(f"file of {size} bytes is too large to replicate")
    return chunk


@dataclass(frozen=True, slots=True)
class Manifest:
    """`chunk_hashes[i]` is the hash of bytes [i*chunk_size, (i+1)*chunk_size) (the last
    chunk is shorter; an empty file has one empty chunk). `digest` is the BLAKE3-256 of the
    whole file (what `b3sum` prints)."""

    name: str
    size: int
    chunk_size: int
    chunk_hashes: tuple[bytes, ...]
    digest: bytes

    def __post_init__(self) -> None:
        if self.size < 0 or self.chunk_size <= 0:
            raise UsageError("manifest: negative size or non-positive chunk size")
        expected = max(1, -(-self.size // self.chunk_size))
        if len(self.chunk_hashes) != expected:
            raise UsageError(
                f"manifest: {len(self.chunk_hashes)} chunk hashes for {expected} chunks"
            )

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_hashes)

    def chunk_offset(self, index: int) -> int:
        return index * self.chunk_size

    def chunk_length(self, index: int) -> int:
        return max(0, min(self.chunk_size, self.size - index * self.chunk_size))

    def range_bytes(self, first: int, end: int) -> int:
        """Bytes in chunks [first, end)."""
        if end <= first:
            return 0
        return min(self.size, end * self.chunk_size) - first * self.chunk_size

    def verifies(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Is `data` chunk `index` of this file?"""
        return len(data) == self.chunk_length(index) and (
            chunk_digest(data) == self.chunk_hashes[index]
        )
