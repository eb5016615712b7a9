"""`meshcast replicate FILE --local N`: try replication on this machine.

Starts N `meshcast daemon` processes on 127.0.0.1..N (`LocalCluster`: one site, fully
meshed, a fresh cluster key, each daemon with its own data directory in a temporary
directory), waits until they agree on one view, asks daemon 1 to replicate FILE to the
others with the live progress of `meshcast replicate`, then reads every copy (streamed,
BLAKE3) and prints its path and digest beside the source's. Every process and file it
made is removed on the way out, whatever happens (a failure, Ctrl-C). Exit 0 only if
every copy exists and equals the source.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import blake3

from meshcast.client import connect
from meshcast.client.replicate_cli import (
    finish,
    follow,
    human_bytes,
    progress_view,
    request_options,
)
from meshcast.client.replication import ReplicationReport
from meshcast.config import ClusterConfig, parse_config
from meshcast.demo.cluster import runtime_dir
from meshcast.errors import MeshcastError, UsageError
from meshcast.runtime.local_cluster import LocalCluster, loopback_mesh_toml

START_TIMEOUT = 60.0  # s: the daemons started, agreed on one view, listening for clients
CONNECT_TIMEOUT = 10.0  # s: connecting to daemon 1
READ_CHUNK = 1 << 20  # bytes read at a time when hashing a copy
MAX_LOCAL = 64  # daemons --local starts at most (127.0.0.1..64, two cores can run that)
LOCAL_RATE = "10Gbit"  # configured up/down rate: loopback is not the limit to plan around


class LocalRunError(MeshcastError):
    """--local could not run: the daemons did not start or agree in time."""


def local_config(count: int, cluster: str) -> ClusterConfig:
    """`count` daemons D1..Dcount on 127.0.0.1..count, one site, fully meshed (ports are
    placeholders: `LocalCluster` picks free ones)."""
    names = [f"D{i}" for i in range(1, count + 1)]
    lines = loopback_mesh_toml(cluster, names, port_base=4800, rate=LOCAL_RATE)
    return parse_config("\n".join(lines) + "\n", source="<meshcast replicate --local>")


def file_digest(path: str | os.PathLike[str]) -> str:
    """BLAKE3 of a file, hex, read in READ_CHUNK pieces (memory stays bounded)."""
    hasher = blake3.blake3()
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while size := file.readinto(buffer):
            hasher.update(view[:size])
    return hasher.hexdigest()


@dataclass(frozen=True, slots=True)
class Copy:
    daemon: str
    path: str | None
    digest: str | None  # None: no copy to read
    error: str = ""


async def _ready(cluster: LocalCluster, names: set[str]) -> dict[str, str]:
    """Wait until every daemon agrees on the view of all and listens; their addresses."""

    def failed() -> str | None:
        for daemon in cluster.daemons.values():
            if daemon.process.returncode is not None:
                return f"daemon {daemon.name} exited with status {daemon.process.returncode}"
            for event in ("clients_unix_unavailable", "daemon_failed"):
                if reports := daemon.named(event):
                    return f"daemon {daemon.name}: {reports[0]}"
        return None

    def ready() -> bool:
        for daemon in cluster.daemons.values():
            agreed = daemon.named("view_agreed")
            listed = agreed[-1].get("names", []) if agreed else []
            if not isinstance(listed, list) or set(map(str, listed)) != names:
                return False
            if not daemon.named("clients_listening"):
                return False
        return True

    if not await cluster.wait_for(lambda: ready() or failed() is not None, START_TIMEOUT):
        raise LocalRunError(f"{len(names)} daemons did not agree on one view in {START_TIMEOUT} s")
    if (why := failed()) is not None:
        raise LocalRunError(why)
    addresses = {}
    for name, daemon in cluster.daemons.items():
        path = daemon.named("clients_listening")[0].get("unix_path")
        if not path:
            raise LocalRunError(f"daemon {name} has no client socket")
        addresses[name] = f"unix:{path}"
    return addresses


async def _copies(report: ReplicationReport) -> list[Copy]:
    """Hash every recipient's copy (in a thread: large files take a while)."""
    copies = []
    for r in report.recipients:
        if r.path is None:
            copies.append(Copy(r.daemon, None, None, r.detail or r.state))
            continue
        try:
            digest = await asyncio.to_thread(file_digest, r.path)
        except OSError as exc:
            copies.append(Copy(r.daemon, r.path, None, f"cannot read it: {exc.strerror or exc}"))
            continue
        copies.append(Copy(r.daemon, r.path, digest))
    return copies


def print_digests(source: str, digest: str, copies: Sequence[Copy], out: TextIO) -> bool:
    """Every copy's path and digest beside the source's; True if all equal it."""
    width = max([len("source"), *(len(c.daemon) for c in copies)])
    print(f"\n{'source':<{width}}  {digest}  {source}", file=out)
    same = bool(copies)
    for c in copies:
        if c.digest is None:
            same = False
            print(f"{c.daemon:<{width}}  {'(no copy)':<64}  {c.error}", file=out)
            continue
        mark = "" if c.digest == digest else "  DIFFERS"
        same = same and c.digest == digest
        print(f"{c.daemon:<{width}}  {c.digest}  {c.path}{mark}", file=out)
    if not copies:
        verdict = "no copies were made"
    elif same:
        verdict = f"all {len(copies)} copies equal the source"
    else:
        verdict = "NOT every copy equals the source"
    print(verdict, file=out)
    return same


def _source(path: str) -> tuple[Path, int]:
    """The file to replicate, absolute, and its size; `UsageError` if it is not a file."""
    source = Path(path).absolute()
    if not source.is_file():
        raise UsageError(f"{path!r} is not a file")
    return source, source.stat().st_size


async def run_local(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    count: int = args.local
    if count > MAX_LOCAL:
        raise UsageError(f"--local starts at most {MAX_LOCAL} daemons, not {count}")
    source, size = _source(args.path)
    err = sys.stderr
    source_digest = await asyncio.to_thread(file_digest, source)
    config = local_config(count, f"local-{os.getpid()}")
    names = {d.name for d in config.daemons}
    print(
        f"meshcast replicate: starting {count} daemons on 127.0.0.1..{count} "
        f"({human_bytes(size)} from D1 to the {count - 1} others)",
        file=err,
    )
    with contextlib.ExitStack() as stack:
        sockets = stack.enter_context(tempfile.TemporaryDirectory(prefix="mc-rep-"))
        return await _run_cluster(args, config, names, source, source_digest, sockets, out)


async def _run_cluster(
    args: argparse.Namespace,
    config: ClusterConfig,
    names: set[str],
    source: Path,
    source_digest: str,
    sockets: str,
    out: TextIO,
) -> int:
    err = sys.stderr
    cluster = LocalCluster(config)
    # the daemons' client sockets go to a private directory (their default socket path is
    # under $XDG_RUNTIME_DIR, read when they start), apart from any other daemon here
    with runtime_dir(sockets):
        await cluster.__aenter__()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_exit(cluster.__aexit__)  # stops every daemon on the way out
        addresses = await _ready(cluster, names)
        client = await connect(addresses["D1"], timeout=CONNECT_TIMEOUT, membership=False)
        async with client:
            handle = await client.replicate(source, args.to or "all", **request_options(args))
            final = await follow(handle, progress_view(err))
        copies = await _copies(final)
        if args.json:  # one object: the final report, the source's digest, every copy's
            same = bool(copies) and all(c.digest == source_digest for c in copies)
            document = {
                **final.to_json(),
                "source": {"path": str(source), "digest": source_digest},
                "copies": [
                    {"daemon": c.daemon, "path": c.path, "digest": c.digest, "error": c.error}
                    for c in copies
                ],
                "all_equal": same,
            }
            print(json.dumps(document), file=out)
            status = 0 if final.ok else finish(final, False, io.StringIO(), err)
        else:
            status = finish(final, False, out, err)
            same = print_digests(str(source), source_digest, copies, out)
    return 0 if status == 0 and same else 1


def replicate_local(args: argparse.Namespace) -> int:
    """The --local runner of `meshcast replicate` (see the module docstring)."""
    from meshcast.client.cli import _run

    return _run(run_local(args), "replicate")


__all__ = ["file_digest", "local_config", "replicate_local", "run_local"]
