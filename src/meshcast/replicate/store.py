"""The file access the replication engine needs, as a protocol: the runtime's disk store
(`meshcast.runtime.blob_store.DiskStore`) and the simulator's synthetic store implement it."""

from __future__ import annotations

from typing import Protocol

from meshcast.replicate.manifest import Manifest


class ChunkStore(Protocol):
    def open_source(self, manifest: Manifest, path: str) -> None: ...

    def begin(self, manifest: Manifest, dest: str | None) -> set[int]: ...

    def read(self, digest: bytes, index: int) -> bytes: ...

    def write(self, digest: bytes, index: int, data: bytes | memoryview) -> None: ...

    def finalize(self, digest: bytes) -> str: ...

    def close(self, digest: bytes) -> None: ...

    def memory(self) -> int: ...
