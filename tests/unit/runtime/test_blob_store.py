"""Replicated files on disk (meshcast.runtime.blob_store): manifests hashed in one pass,
received files written to a partial file and renamed into place once verified, resume
from a partial file, complete files recognised (through the index), names and
destinations from the network checked. Real files in tmp_path."""

from __future__ import annotations

import os
import random
import resource
import signal
import stat
import tempfile
import threading
from pathlib import Path

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcast.errors import BlobUnavailable, IntegrityError, UsageError
from meshcast.replicate.manifest import Manifest, chunk_size_for
from meshcast.runtime.blob_store import (
    INDEX_NAME,
    DiskStore,
    check_name,
    hash_file,
    partial_name,
)

CHUNK = 4096


def make_file(path: Path, size: int, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def replicate(
    manifest: Manifest, source: DiskStore, dest: DiskStore, order: list[int] | None = None
) -> str:
    """Every chunk from `source` to `dest` (in `order`), then finalize: the final path."""
    held = dest.begin(manifest, None)
    for index in order if order is not None else range(manifest.chunk_count):
        if index not in held:
            dest.write(manifest.digest, index, source.read(manifest.digest, index))
    return dest.finalize(manifest.digest)


@pytest.fixture
def origin(tmp_path: Path) -> tuple[Path, bytes, Manifest, DiskStore]:
    """A 10-chunk-and-a-bit file opened as a source."""
    path = tmp_path / "origin" / "release.tar"
    path.parent.mkdir()
    data = make_file(path, 10 * CHUNK + 123)
    manifest = hash_file(str(path), CHUNK)
    source = DiskStore(tmp_path / "origin-store")
    source.open_source(manifest, str(path))
    return path, data, manifest, source


# -- hash_file


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 7])
def test_hash_file_agrees_with_blake3_whole_and_per_chunk(tmp_path: Path, size: int) -> None:
    path = tmp_path / "f.bin"
    data = make_file(path, size)
    manifest = hash_file(str(path), CHUNK)
    assert manifest.name == "f.bin"
    assert manifest.size == size
    assert manifest.digest == blake3.blake3(data).digest()
    chunks = [data[at : at + CHUNK] for at in range(0, size, CHUNK)] or [b""]
    assert manifest.chunk_hashes == tuple(blake3.blake3(c).digest() for c in chunks)
    assert all(manifest.verifies(i, c) for i, c in enumerate(chunks))


def test_hash_file_spans_blocks_and_picks_the_default_chunk_size(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = make_file(path, 9 * 1024 * 1024 + 5)  # more than one 8 MiB read block
    manifest = hash_file(str(path))
    assert manifest.chunk_size == chunk_size_for(len(data))
    assert manifest.digest == blake3.blake3(data).digest()
    last = (manifest.chunk_count - 1) * manifest.chunk_size
    assert manifest.chunk_hashes[-1] == blake3.blake3(data[last:]).digest()


def test_hash_file_refuses_a_missing_file_and_a_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.bin"
    with pytest.raises(BlobUnavailable, match=r"nope\.bin: no such file"):
        hash_file(str(missing))
    with pytest.raises(BlobUnavailable, match="not a regular file"):
        hash_file(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_hash_file_refuses_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.bin"
    make_file(path, 10)
    path.chmod(0)
    with pytest.raises(BlobUnavailable, match=r"secret\.bin: permission denied"):
        hash_file(str(path))


# -- receiving


def test_round_trip_gives_the_same_bytes_at_the_final_name_mode_0600(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, data, manifest, source = origin
    dest = DiskStore(tmp_path / "recv")
    assert mode(tmp_path / "recv") == 0o700
    assert dest.begin(manifest, None) == set()
    assert dest.memory() >= manifest.chunk_count
    final = replicate(manifest, source, dest)
    assert final == str((tmp_path / "recv" / "release.tar").resolve())
    assert Path(final).read_bytes() == data
    assert mode(Path(final)) == 0o600
    assert sorted(os.listdir(tmp_path / "recv")) == [INDEX_NAME, "release.tar"]
    # the complete file serves reads (a recipient forwards what it holds)
    assert dest.read(manifest.digest, 3) == data[3 * CHUNK : 4 * CHUNK]
    assert dest.finalize(manifest.digest) == final
    stats = dest.statistics()
    assert (stats.chunks_written, stats.files_finalized) == (manifest.chunk_count, 1)
    assert stats.bytes_written == len(data)


def test_chunks_written_out_of_order(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, data, manifest, source = origin
    dest = DiskStore(tmp_path / "recv")
    order = list(range(manifest.chunk_count))
    random.Random(7).shuffle(order)
    final = replicate(manifest, source, dest, order)
    assert Path(final).read_bytes() == data


def test_a_corrupted_byte_on_disk_fails_finalize_and_leaves_no_final_file(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, _, manifest, source = origin
    recv = tmp_path / "recv"
    dest = DiskStore(recv)
    dest.begin(manifest, None)
    for index in range(manifest.chunk_count):
        dest.write(manifest.digest, index, source.read(manifest.digest, index))
    partial = recv / partial_name(manifest.name, manifest.digest)
    with partial.open("r+b") as f:  # the disk flips a byte of chunk 4
        f.seek(4 * CHUNK + 100)
        byte = f.read(1)
        f.seek(4 * CHUNK + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match=r"bad chunks: \[4\]") as caught:
        dest.finalize(manifest.digest)
    assert caught.value.chunks == (4,)
    assert not (recv / manifest.name).exists()
    assert partial.exists()  # kept: the other chunks are good
    assert dest.statistics().integrity_failures == 1
    with pytest.raises(UsageError, match="not held"):
        dest.read(manifest.digest, 4)
    # the bad chunk is fetched again and the file completes
    dest.write(manifest.digest, 4, source.read(manifest.digest, 4))
    assert Path(dest.finalize(manifest.digest)).exists()


def test_a_partial_file_grown_on_disk_fails_finalize(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, _, manifest, source = origin
    recv = tmp_path / "recv"
    dest = DiskStore(recv)
    dest.begin(manifest, None)
    for index in range(manifest.chunk_count):
        dest.write(manifest.digest, index, source.read(manifest.digest, index))
    with (recv / partial_name(manifest.name, manifest.digest)).open("ab") as f:
        f.write(b"appended")
    with pytest.raises(IntegrityError, match="changed on disk"):
        dest.finalize(manifest.digest)
    assert not (recv / manifest.name).exists()


def test_a_manifest_whose_digest_contradicts_its_chunks_never_completes(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, _, manifest, source = origin
    lying = Manifest(
        manifest.name, manifest.size, manifest.chunk_size, manifest.chunk_hashes, b"\0" * 32
    )
    dest = DiskStore(tmp_path / "recv")
    dest.begin(lying, None)
    for index in range(manifest.chunk_count):
        dest.write(lying.digest, index, source.read(manifest.digest, index))
    with pytest.raises(IntegrityError) as caught:
        dest.finalize(lying.digest)
    assert caught.value.chunks == ()
    assert not (tmp_path / "recv" / manifest.name).exists()


def test_resume_returns_exactly_the_chunks_written_before(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, data, manifest, source = origin
    first = DiskStore(tmp_path / "recv")
    first.begin(manifest, None)
    written = {0, 3, 4, 9, manifest.chunk_count - 1}
    for index in written:
        first.write(manifest.digest, index, source.read(manifest.digest, index))
    first.close_all()  # the daemon stops (or crashes: the bytes are in the page cache)
    second = DiskStore(tmp_path / "recv")
    assert second.begin(manifest, None) == written
    assert second.statistics().chunks_resumed == len(written)
    assert second.read(manifest.digest, 3) == data[3 * CHUNK : 4 * CHUNK]
    assert Path(replicate(manifest, source, second)).read_bytes() == data


def test_resume_skips_a_chunk_corrupted_in_the_partial_file(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, data, manifest, source = origin
    recv = tmp_path / "recv"
    first = DiskStore(recv)
    first.begin(manifest, None)
    for index in (1, 2):
        first.write(manifest.digest, index, source.read(manifest.digest, index))
    first.close(manifest.digest)
    with (recv / partial_name(manifest.name, manifest.digest)).open("r+b") as f:
        f.seek(2 * CHUNK)
        f.write(b"torn")
    second = DiskStore(recv)
    assert second.begin(manifest, None) == {1}
    assert Path(replicate(manifest, source, second)).read_bytes() == data


def test_resume_from_a_short_partial_file_holds_only_whole_chunks(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, data, manifest, source = origin
    recv = tmp_path / "recv"
    recv.mkdir()
    # a partial file cut halfway through chunk 3 (an older meshcast, a full disk...)
    (recv / partial_name(manifest.name, manifest.digest)).write_bytes(data[: 3 * CHUNK + 10])
    store = DiskStore(recv)
    assert store.begin(manifest, None) == {0, 1, 2}
    assert Path(replicate(manifest, source, store)).read_bytes() == data


def test_chunks_larger_than_a_read_block(tmp_path: Path) -> None:
    path = tmp_path / "f"
    chunk = 9 * 1024 * 1024  # spans two 8 MiB read blocks
    data = make_file(path, 2 * chunk + 5)
    manifest = hash_file(str(path), chunk)
    assert manifest.chunk_hashes == tuple(
        blake3.blake3(data[at : at + chunk]).digest() for at in range(0, len(data), chunk)
    )
    source = DiskStore(tmp_path / "s")
    source.open_source(manifest, str(path))
    first = DiskStore(tmp_path / "recv")
    first.begin(manifest, None)
    first.write(manifest.digest, 1, source.read(manifest.digest, 1))
    first.close_all()
    second = DiskStore(tmp_path / "recv")
    assert second.begin(manifest, None) == {1}
    assert Path(replicate(manifest, source, second)).read_bytes() == data


def test_a_complete_file_is_all_held_and_the_index_spares_a_rehash(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, data, manifest, source = origin
    recv = tmp_path / "recv"
    replicate(manifest, source, DiskStore(recv))
    again = DiskStore(recv)
    assert again.begin(manifest, None) == set(range(manifest.chunk_count))
    stats = again.statistics()
    assert (stats.files_already_complete, stats.index_hits, stats.bytes_hashed) == (1, 1, 0)
    assert again.finalize(manifest.digest) == str((recv / manifest.name).resolve())
    assert again.read(manifest.digest, 0) == data[:CHUNK]
    again.write(manifest.digest, 0, data[:CHUNK])  # already held: nothing happens
    assert again.statistics().chunks_written == 0


def test_a_stale_index_entry_is_rehashed(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, data, manifest, source = origin
    recv = tmp_path / "recv"
    final = Path(replicate(manifest, source, DiskStore(recv)))
    os.utime(final, ns=(1, 1))  # touched: the index entry no longer describes the file
    again = DiskStore(recv)
    assert again.begin(manifest, None) == set(range(manifest.chunk_count))
    stats = again.statistics()
    assert (stats.index_hits, stats.bytes_hashed) == (0, len(data))
    again.close_all()
    third = DiskStore(recv)  # ... and re-recorded by that hash
    third.begin(manifest, None)
    assert (third.statistics().index_hits, third.statistics().bytes_hashed) == (1, 0)


def test_a_complete_file_without_index_is_hashed_and_recognised(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, data, manifest, _ = origin
    recv = tmp_path / "recv"
    recv.mkdir()
    (recv / manifest.name).write_bytes(data)  # copied by hand
    store = DiskStore(recv)
    assert store.begin(manifest, None) == set(range(manifest.chunk_count))
    assert store.statistics().bytes_hashed == len(data)


def test_another_file_of_the_same_name_is_replaced_only_at_finalize(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, data, manifest, source = origin
    recv = tmp_path / "recv"
    recv.mkdir()
    old = random.Random(99).randbytes(len(data))  # same size, other bytes
    (recv / manifest.name).write_bytes(old)
    dest = DiskStore(recv)
    assert dest.begin(manifest, None) == set()
    for index in range(manifest.chunk_count):
        dest.write(manifest.digest, index, source.read(manifest.digest, index))
        assert (recv / manifest.name).read_bytes() == old
    dest.finalize(manifest.digest)
    assert (recv / manifest.name).read_bytes() == data


def test_a_symlink_at_the_final_name_is_neither_trusted_nor_followed(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    path, data, manifest, source = origin
    recv = tmp_path / "recv"
    recv.mkdir()
    (recv / manifest.name).symlink_to(path)  # points at a good copy outside the store
    dest = DiskStore(recv)
    assert dest.begin(manifest, None) == set()
    replicate(manifest, source, dest)
    assert not (recv / manifest.name).is_symlink()
    assert path.read_bytes() == data


def test_a_fifo_is_refused_as_source_and_ignored_at_the_final_name(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, data, manifest, source = origin
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BlobUnavailable, match="fifo: not a regular file"):
        hash_file(str(fifo))  # does not block waiting for a writer
    recv = tmp_path / "recv"
    recv.mkdir()
    os.mkfifo(recv / manifest.name)
    dest = DiskStore(recv)
    assert dest.begin(manifest, None) == set()
    assert Path(replicate(manifest, source, dest)).read_bytes() == data


def test_empty_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    manifest = hash_file(str(path))
    source = DiskStore(tmp_path / "s")
    source.open_source(manifest, str(path))
    dest = DiskStore(tmp_path / "recv")
    final = replicate(manifest, source, dest)
    assert Path(final).read_bytes() == b""
    dest.close_all()
    assert DiskStore(tmp_path / "recv").begin(manifest, None) == {0}


def test_misuse_raises_usage_error(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, data, manifest, source = origin
    dest = DiskStore(tmp_path / "recv")
    with pytest.raises(UsageError, match="not open"):
        dest.read(manifest.digest, 0)
    assert dest.begin(manifest, None) == set()
    assert dest.begin(manifest, None) == set()  # the same begin again: the same answer
    with pytest.raises(UsageError, match="already open"):
        dest.begin(manifest, "elsewhere")
    with pytest.raises(UsageError, match="not held"):
        dest.read(manifest.digest, 0)
    with pytest.raises(UsageError, match="not 3"):
        dest.write(manifest.digest, 0, b"abc")
    with pytest.raises(UsageError, match="out of range"):
        dest.write(manifest.digest, manifest.chunk_count, b"")
    with pytest.raises(UsageError, match="not written yet"):
        dest.finalize(manifest.digest)
    with pytest.raises(UsageError, match="is a source"):
        source.write(manifest.digest, 0, data[:CHUNK])
    dest.close(manifest.digest)
    dest.close(manifest.digest)  # closing twice is harmless
    assert dest.memory() == 0


# -- sources


def test_a_missing_or_changed_source_is_unavailable(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    path, _, manifest, _ = origin
    store = DiskStore(tmp_path / "other")
    with pytest.raises(BlobUnavailable, match=r"gone\.tar: no such file"):
        store.open_source(manifest, str(tmp_path / "gone.tar"))
    with pytest.raises(BlobUnavailable, match="not a regular file"):
        store.open_source(manifest, str(tmp_path))
    with path.open("ab") as f:
        f.write(b"more")
    with pytest.raises(BlobUnavailable, match="changed since it was hashed"):
        store.open_source(manifest, str(path))


# -- names and destinations from the network


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "a/b",
        "../x",
        "/etc/passwd",
        "a\0b",
        "é" * 128,  # 256 bytes of UTF-8
        "\udcff",  # not encodable
        INDEX_NAME,
        "x.meshcast-partial",
    ],
)
def test_bad_names_are_refused(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore], name: str
) -> None:
    _, _, manifest, _ = origin
    bad = Manifest(name, manifest.size, manifest.chunk_size, manifest.chunk_hashes, manifest.digest)
    store = DiskStore(tmp_path / "recv")
    with pytest.raises(BlobUnavailable, match="bad file name"):
        store.begin(bad, None)
    assert os.listdir(tmp_path / "recv") == []


def test_a_name_of_255_bytes_round_trips(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, data, manifest, source = origin
    name = "é" * 127 + "x"  # 255 bytes: the partial file's name must be cut to fit
    check_name(name)
    assert len(partial_name(name, manifest.digest).encode()) <= 255
    long = Manifest(
        name, manifest.size, manifest.chunk_size, manifest.chunk_hashes, manifest.digest
    )
    final = replicate(long, source, DiskStore(tmp_path / "recv"))
    assert Path(final).name == name
    assert Path(final).read_bytes() == data


def test_destinations_must_stay_inside_the_allowed_directories(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, data, manifest, source = origin
    root = tmp_path / "root"
    allowed = tmp_path / "shared"
    allowed.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    store = DiskStore(root, allowed_dest=[allowed])
    (root / "escape").symlink_to(outside)  # a symlink inside the root leading out
    for dest in ["../outside", str(outside), "escape", "escape/deeper", "sub/../../outside", "/"]:
        with pytest.raises(BlobUnavailable, match="outside the allowed directories"):
            store.begin(manifest, dest)
    for dest in ["", "bad\0dir"]:
        with pytest.raises(BlobUnavailable, match="bad destination"):
            store.begin(manifest, dest)
    assert os.listdir(outside) == []
    # a relative dest is under the root, created 0o700; an allowed absolute one works too
    held = store.begin(manifest, "releases/v1")
    assert held == set()
    assert mode(root / "releases") == mode(root / "releases" / "v1") == 0o700
    store.close(manifest.digest)
    store.begin(manifest, str(allowed / "in"))
    for index in range(manifest.chunk_count):
        store.write(manifest.digest, index, source.read(manifest.digest, index))
    assert store.finalize(manifest.digest) == str(allowed.resolve() / "in" / manifest.name)
    assert (allowed / "in" / manifest.name).read_bytes() == data


def test_a_file_that_cannot_be_preallocated_leaves_no_partial_file(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, _, manifest, _ = origin
    store = DiskStore(tmp_path / "recv")
    # the file size limit stands in for a full disk: both refuse the preallocation
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (CHUNK, limits[1]))
    try:
        with pytest.raises(BlobUnavailable, match=r"release\.tar\..*meshcast-partial"):
            store.begin(manifest, None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert os.listdir(tmp_path / "recv") == []
    assert store.memory() == 0


def test_a_dest_that_is_a_file_is_unavailable(
    tmp_path: Path, origin: tuple[Path, bytes, Manifest, DiskStore]
) -> None:
    _, _, manifest, _ = origin
    store = DiskStore(tmp_path / "root")
    (tmp_path / "root" / "plain").write_bytes(b"x")
    with pytest.raises(BlobUnavailable, match="plain"):
        store.begin(manifest, "plain")


# -- threads


def test_finalize_in_a_worker_thread_while_another_file_is_written(tmp_path: Path) -> None:
    files = []
    for n in range(2):
        path = tmp_path / f"f{n}"
        data = make_file(path, 300 * CHUNK + n, seed=n)
        manifest = hash_file(str(path), CHUNK)
        files.append((path, data, manifest))
    source = DiskStore(tmp_path / "s")
    dest = DiskStore(tmp_path / "recv")
    for path, _, manifest in files:
        source.open_source(manifest, str(path))
        dest.begin(manifest, None)
    first, second = files[0][2], files[1][2]
    for index in range(first.chunk_count):
        dest.write(first.digest, index, source.read(first.digest, index))
    results: list[str | BaseException] = []

    def finalize() -> None:
        try:
            results.append(dest.finalize(first.digest))
        except BaseException as exc:
            results.append(exc)

    worker = threading.Thread(target=finalize)
    worker.start()
    for index in range(second.chunk_count):
        dest.write(second.digest, index, source.read(second.digest, index))
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert results == [str((tmp_path / "recv" / "f0").resolve())]
    assert Path(dest.finalize(second.digest)).read_bytes() == files[1][1]
    assert (tmp_path / "recv" / "f0").read_bytes() == files[0][1]


def test_reads_and_a_close_may_come_while_the_same_file_is_finalized(tmp_path: Path) -> None:
    path = tmp_path / "big"
    data = make_file(path, 16 * 1024 * 1024)  # long enough to hash that calls overlap
    manifest = hash_file(str(path), 64 * 1024)
    source = DiskStore(tmp_path / "s")
    source.open_source(manifest, str(path))
    dest = DiskStore(tmp_path / "recv")
    dest.begin(manifest, None)
    for index in range(manifest.chunk_count):
        dest.write(manifest.digest, index, source.read(manifest.digest, index))
    results: list[str | BaseException] = []

    def finalize() -> None:
        try:
            results.append(dest.finalize(manifest.digest))
        except BaseException as exc:
            results.append(exc)

    worker = threading.Thread(target=finalize)
    worker.start()
    for index in range(0, manifest.chunk_count, 7):  # a node forwards while it finalizes
        assert dest.read(manifest.digest, index) == source.read(manifest.digest, index)
    dest.close(manifest.digest)
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert results == [str((tmp_path / "recv" / "big").resolve())]
    assert (tmp_path / "recv" / "big").read_bytes() == data
    with pytest.raises(UsageError, match="not open"):
        dest.read(manifest.digest, 0)


# -- any size, any chunk size, any order


@given(
    size=st.integers(0, 70_000),
    chunk_size=st.integers(1, 20_000),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_file_round_trips_in_any_order(size: int, chunk_size: int, seed: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        path = base / "f"
        data = rng.randbytes(size)
        path.write_bytes(data)
        manifest = hash_file(str(path), chunk_size)
        assert manifest.digest == blake3.blake3(data).digest()
        source = DiskStore(base / "s")
        source.open_source(manifest, str(path))
        order = list(range(manifest.chunk_count))
        rng.shuffle(order)
        cut = rng.randrange(len(order) + 1)
        first = DiskStore(base / "recv")
        first.begin(manifest, None)
        for index in order[:cut]:
            first.write(manifest.digest, index, source.read(manifest.digest, index))
        first.close_all()  # a restart halfway
        second = DiskStore(base / "recv")
        resumed = second.begin(manifest, None)
        assert resumed >= set(order[:cut])
        for index in resumed - set(order[:cut]):  # a chunk of zeros matches the preallocation
            assert manifest.verifies(index, bytes(manifest.chunk_length(index)))
        final = replicate(manifest, source, second, order)
        assert Path(final).read_bytes() == data
        source.close_all()
        second.close_all()
