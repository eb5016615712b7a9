"""Cluster keys with real processes: `meshcast keygen`, daemons refusing to start without a
key, an insecure daemon's warnings and status, and SIGHUP reloading the key files.

Every daemon is a ``meshcast daemon`` child on 127.0.0.x (or, for the repeated warning, a
daemon object on real sockets in this process), stopped whatever happens; every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from meshcast.config import load_config
from meshcast.runtime.daemon import OverlayDaemon
from meshcast.runtime.endpoints import ClientListen
from meshcast.runtime.keyfile import new_key, read_key_file, write_key_file
from meshcast.runtime.local_cluster import free_udp_ports
from meshcast.runtime.logs import EVENTS_LOGGER

from .daemon_helpers import (
    DAEMON_COMMAND,
    DaemonProcess,
    cluster_toml,
    host_of,
    run_command,
    write_key,
)

pytestmark = [pytest.mark.timeout(120)]

MESHCAST = (sys.executable, "-m", "meshcast")
WAIT = 15.0  # s: an event or report the test waits for, interpreter start-up included


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short private directory for client sockets (the AF_UNIX path limit)."""
    directory = Path(tempfile.mkdtemp(prefix="mckey", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def one_daemon_cluster(directory: Path, security: str) -> Path:
    """A cluster file of one daemon, d1, with `security` as its [security] section."""
    text = cluster_toml(1, [], free_udp_ports([host_of(1)]))
    head, _, _ = text.partition("[security]\n")
    path = directory / "cluster.toml"
    path.write_text(head + "[security]\n" + security, encoding="utf-8")
    return path


async def status(socket: Path, *options: str) -> tuple[int, str, str]:
    return await run_command(*MESHCAST, "status", "--socket", f"unix:{socket}", *options)


async def status_json(socket: Path) -> dict[str, Any]:
    code, out, err = await status(socket, "--json")
    assert code == 0, err
    report: dict[str, Any] = json.loads(out)
    return report


# ---------------------------------------------------------------------------------------
# meshcast keygen
# ---------------------------------------------------------------------------------------


def keygen(*argv: str) -> tuple[int, str, str]:
    """Run ``python -m meshcast keygen ARGV``: (exit status, stdout, stderr)."""
    done = subprocess.run(
        [*MESHCAST, "keygen", *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def test_keygen_writes_a_private_key_and_never_overwrites_without_force(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    code, out, err = keygen(str(path))
    assert code == 0, err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_key_file(path)
    assert key.fingerprint in out
    assert key.secret.hex() not in out + err
    before = path.read_bytes()

    code, out, err = keygen(str(path))
    assert code == 2
    assert out == ""
    assert err.startswith(f"meshcast: error: {path}: the file already exists")
    assert "--force" in err
    assert path.read_bytes() == before

    code, out, err = keygen("--force", str(path))
    assert code == 0, err
    replaced = read_key_file(path)
    assert replaced != key
    assert replaced.fingerprint in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.key"]


def test_keygen_into_a_missing_directory_fails_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "cluster.key"
    code, _, err = keygen(str(path))
    assert code == 2
    assert f"{path}: cannot create the key file" in err


# ---------------------------------------------------------------------------------------
# A daemon needs a key
# ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_daemon_without_a_key_refuses_to_start_and_says_what_to_do(
    tmp_path: Path,
) -> None:
    config = one_daemon_cluster(tmp_path, "")
    code, out, err = await run_command(*DAEMON_COMMAND, "--config", str(config), "--name", "d1")
    assert code == 2
    assert out == ""
    assert err == (
        f"meshcast daemon: error: {config}:security.key_file: a daemon needs a cluster key: "
        "create one with `meshcast keygen FILE` and name it in the cluster file under "
        '[security] as key_file = "FILE" (the same key on every daemon), or set insecure = '
        "true there to run without encryption or authentication\n"
    )


@pytest.mark.asyncio
async def test_a_daemon_refuses_a_key_file_others_can_read(tmp_path: Path) -> None:
    key = write_key(tmp_path)
    key.chmod(0o644)
    config = one_daemon_cluster(tmp_path, 'key_file = "cluster.key"\n')
    code, _, err = await run_command(*DAEMON_COMMAND, "--config", str(config), "--name", "d1")
    assert code == 2
    assert f"{key}: the key file can be read or written by others (mode 0644)" in err
    assert f"run `chmod 600 {key}`" in err


@pytest.mark.asyncio
async def test_a_key_file_and_insecure_together_are_a_config_error(tmp_path: Path) -> None:
    write_key(tmp_path)
    config = one_daemon_cluster(tmp_path, 'key_file = "cluster.key"\ninsecure = true\n')
    code, _, err = await run_command(*DAEMON_COMMAND, "--config", str(config), "--name", "d1")
    assert code == 2
    assert f"{config}:security.insecure: insecure = true and a key_file contradict" in err


# ---------------------------------------------------------------------------------------
# insecure = true: loud
# ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_insecure_daemon_warns_and_status_shows_insecure(
    tmp_path: Path, sockets: Path
) -> None:
    config = one_daemon_cluster(tmp_path, "insecure = true\n")
    socket = sockets / "d1.sock"
    daemon = await DaemonProcess.start(config, "d1", "--client-socket", str(socket))
    try:
        security = await daemon.wait_event("security", timeout=WAIT)
        assert (security["mode"], security["keys"]) == ("INSECURE", [])
        warning = await daemon.wait_event("insecure_warning", timeout=WAIT)
        assert warning["level"] == "warning"
        assert warning["message"].startswith("INSECURE: this daemon neither encrypts")
        await daemon.wait_event("clients_listening", timeout=WAIT)

        report = await status_json(socket)
        assert report["security"]["mode"] == "INSECURE"
        assert report["security"]["keys"] == []
        code, out, err = await status(socket)
        assert code == 0, err
        assert out.splitlines()[0].startswith("INSECURE: ")
    finally:
        await daemon.stop()


@pytest.mark.asyncio
async def test_an_insecure_daemon_repeats_its_warning(tmp_path: Path) -> None:
    # In this process, so the interval (a minute by default) can be short.
    config = load_config(one_daemon_cluster(tmp_path, "insecure = true\n"))
    warnings: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == "insecure_warning":
                warnings.append(record)

    handler = Collect()
    events = logging.getLogger(EVENTS_LOGGER)
    events.addHandler(handler)
    old_level = events.level
    events.setLevel(logging.INFO)
    stop = asyncio.Event()
    daemon = await OverlayDaemon.open(
        config, "d1", clients=ClientListen(unix_path=""), insecure_warning_interval=0.05
    )
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(daemon.serve(stop))
            try:
                async with asyncio.timeout(WAIT):
                    while len(warnings) < 3:  # noqa: ASYNC110 - the log is what we wait on
                        await asyncio.sleep(0.01)
            finally:
                stop.set()
    finally:
        await daemon.aclose()
        events.removeHandler(handler)
        events.setLevel(old_level)
    assert all(record.levelno == logging.WARNING for record in warnings)
    assert daemon.keyring is None


# ---------------------------------------------------------------------------------------
# SIGHUP
# ---------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def keyed_daemon(tmp_path: Path, sockets: Path) -> AsyncIterator[DaemonProcess]:
    write_key(tmp_path)
    config = one_daemon_cluster(tmp_path, 'key_file = "cluster.key"\n')
    daemon = await DaemonProcess.start(config, "d1", "--client-socket", str(sockets / "d1.sock"))
    try:
        await daemon.wait_event("clients_listening", timeout=WAIT)
        yield daemon
    finally:
        await daemon.stop()


@pytest.mark.asyncio
async def test_sighup_rolls_a_next_key_in_and_the_old_one_out(
    tmp_path: Path, sockets: Path, keyed_daemon: DaemonProcess
) -> None:
    daemon, socket = keyed_daemon, sockets / "d1.sock"
    config = tmp_path / "cluster.toml"
    old = read_key_file(tmp_path / "cluster.key")
    started = await daemon.wait_event("security", timeout=WAIT)
    assert started["mode"] == "encrypted"
    assert started["keys"] == [
        {"role": "current", "fingerprint": old.fingerprint, "key_id": old.key_id}
    ]
    assert (await status_json(socket))["security"]["keys"] == started["keys"]

    # step 1: the new key as next_key_file
    new = new_key()
    write_key_file(tmp_path / "new.key", new)
    text = config.read_text(encoding="utf-8")
    config.write_text(text + 'next_key_file = "new.key"\n', encoding="utf-8")
    mark = len(daemon.events)
    daemon.send_signal(signal.SIGHUP)
    reloaded = await daemon.wait_event("keys_reloaded", timeout=WAIT, after=mark)
    assert [k["fingerprint"] for k in reloaded["keys"]] == [new.fingerprint, old.fingerprint]
    assert [k["role"] for k in reloaded["keys"]] == ["next", "current"]
    report = await status_json(socket)
    assert report["security"]["keys"] == reloaded["keys"]
    assert report["security"]["key_reloads"] == 1

    # step 2: the new key becomes the key, the old one is dropped
    config.write_text(text.replace("cluster.key", "new.key"), encoding="utf-8")
    mark = len(daemon.events)
    daemon.send_signal(signal.SIGHUP)
    reloaded = await daemon.wait_event("keys_reloaded", timeout=WAIT, after=mark)
    assert reloaded["keys"] == [
        {"role": "current", "fingerprint": new.fingerprint, "key_id": new.key_id}
    ]
    assert (await status_json(socket))["security"]["key_reloads"] == 2
    assert not daemon.named("keys_reload_failed")
    for event in daemon.events:  # the secrets are never logged
        assert old.secret.hex() not in json.dumps(event)
        assert new.secret.hex() not in json.dumps(event)


@pytest.mark.asyncio
async def test_a_failed_reload_keeps_the_old_keys_and_the_daemon_serving(
    tmp_path: Path, sockets: Path, keyed_daemon: DaemonProcess
) -> None:
    daemon, socket = keyed_daemon, sockets / "d1.sock"
    key_path = tmp_path / "cluster.key"
    old = read_key_file(key_path)
    before = (await status_json(socket))["security"]["keys"]

    key_path.write_text("meshcast-cluster-key-v1 not-hex\n", encoding="utf-8")
    mark = len(daemon.events)
    daemon.send_signal(signal.SIGHUP)
    failed = await daemon.wait_event("keys_reload_failed", timeout=WAIT, after=mark)
    assert failed["level"] == "error"
    assert failed["reason"] == f"{key_path}: the key is not hexadecimal"
    assert failed["keys"] == before

    config = tmp_path / "cluster.toml"
    text = config.read_text(encoding="utf-8")
    config.write_text(text + "oops = [\n", encoding="utf-8")
    mark = len(daemon.events)
    daemon.send_signal(signal.SIGHUP)
    failed = await daemon.wait_event("keys_reload_failed", timeout=WAIT, after=mark)
    assert "invalid TOML" in failed["reason"]

    # a reload never turns the protection off
    config.write_text(text.replace('key_file = "cluster.key"', "insecure = true"), encoding="utf-8")
    mark = len(daemon.events)
    daemon.send_signal(signal.SIGHUP)
    failed = await daemon.wait_event("keys_reload_failed", timeout=WAIT, after=mark)
    assert "switching between insecure and encrypted needs a restart" in failed["reason"]

    report = await status_json(socket)  # still serving, with the key it had
    assert report["security"] == {
        "mode": "encrypted",
        "keys": [{"role": "current", "fingerprint": old.fingerprint, "key_id": old.key_id}],
        "key_reloads": 0,
        "key_reload_failures": 3,
    }
    assert daemon.process.returncode is None
    assert not daemon.named("keys_reloaded")
