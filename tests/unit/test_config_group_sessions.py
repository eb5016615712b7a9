"""[group] and [sessions] of the cluster file: the ordering engine's and the client
sessions' settable parameters (docs/config.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from meshcast.config import (
    ClusterConfig,
    LimitsConfig,
    SessionsConfig,
    dump_config,
    load_config,
    parse_config,
)
from meshcast.errors import ConfigError
from meshcast.group import GroupConfig
from meshcast.group.sessions import SessionConfig
from meshcast.overlay.node import OverlayConfig

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "cluster.toml"
DAEMON = '[[sites]]\nname = "s"\n[[daemons]]\nname = "A"\nid = 1\nhost = "127.0.0.1"\n'
DAEMON += 'port = 5001\nsite = "s"\nupload = "1Gbit"\ndownload = "1Gbit"\n'
SETTABLE_GROUP = [
    "idle_ts_interval",
    "null_lead",
    "max_held_messages",
    "max_future_messages",
    "ack_interval",
    "flush_retry_interval",
    "repair_after",
    "max_retained_messages",
    "max_retained_bytes",
]


def parse(head: str) -> ClusterConfig:
    """The one-daemon cluster with `head` (sections or top-level keys) before it."""
    return parse_config(head + "\n" + DAEMON, SOURCE)


def problems(head: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse(head)
    return [(p.key, p.message) for p in info.value.problems]


def test_defaults_are_the_layers_defaults() -> None:
    config = parse("")
    assert config.group == GroupConfig()
    default = SessionConfig()
    assert config.sessions == SessionsConfig(
        default.max_backlog, default.status_max_groups, default.status_max_members
    )


def test_every_group_key_with_units() -> None:
    config = parse(
        '[group]\nidle_ts_interval = "5ms"\nnull_lead = 4096\nmax_held_messages = 500\n'
        'max_future_messages = 700\nack_interval = 0.04\nflush_retry_interval = "500ms"\n'
        'repair_after = "2s"\nmax_retained_messages = 9000\nmax_retained_bytes = "8MiB"\n'
    )
    assert config.group == GroupConfig(
        idle_ts_interval=0.005,
        null_lead=4096,
        max_held_messages=500,
        max_future_messages=700,
        ack_interval=0.04,
        flush_retry_interval=0.5,
        repair_after=2.0,
        max_retained_messages=9000,
        max_retained_bytes=8 * 2**20,
    )


def test_every_sessions_key_with_units() -> None:
    config = parse(
        '[sessions]\nmax_backlog = "1MiB"\nstatus_max_groups = 3\nstatus_max_members = 0\n'
    )
    assert config.sessions == SessionsConfig(2**20, 3, 0)


@pytest.mark.parametrize(
    ("tail", "key", "fragment"),
    [
        ("[group]\nidle_ts_interval = 0\n", "group.idle_ts_interval", "positive number of seconds"),
        ('[group]\nack_interval = "2 parsecs"\n', "group.ack_interval", "unknown duration unit"),
        ('[group]\nrepair_after = "fast"\n', "group.repair_after", "cannot parse duration"),
        ("[group]\nnull_lead = 0\n", "group.null_lead", "positive integer"),
        ("[group]\nmax_held_messages = 1.5\n", "group.max_held_messages", "must be an integer"),
        ('[group]\nmax_retained_bytes = "1.5B"\n', "group.max_retained_bytes", "whole number"),
        ("[group]\nidle_ts = 1\n", "group.idle_ts", "did you mean 'idle_ts_interval'"),
        # protocol-internal bounds are not settable
        ("[group]\ndedup_window = 10\n", "group.dedup_window", "unknown key"),
        ('[sessions]\nmax_backlog = "0B"\n', "sessions.max_backlog", "at least 1"),
        ('[sessions]\nmax_backlog = "64 MiBs"\n', "sessions.max_backlog", "unknown size unit"),
        ("[sessions]\nstatus_max_groups = -1\n", "sessions.status_max_groups", "at least 0"),
        ("[sessions]\nstatus_max_member = 5\n", "sessions.status_max_member", "did you mean"),
        # these belong to [limits]: one key, one place
        ("[sessions]\nmax_clients = 5\n", "sessions.max_clients", "unknown key"),
        ('group = "fast"\n', "group", "must be a table"),
    ],
)
def test_bad_values_name_their_key(tail: str, key: str, fragment: str) -> None:
    found = problems(tail)
    assert found[0][0] == key, found
    assert fragment in found[0][1], found


def test_every_mistake_of_both_sections_is_listed() -> None:
    found = problems(
        "[group]\nidle_ts_interval = -1\nack_intervall = 1\n"
        "[sessions]\nmax_backlog = true\nstatus_max_members = -2\n"
    )
    assert [key for key, _ in found] == [
        "group.ack_intervall",
        "group.idle_ts_interval",
        "sessions.max_backlog",
    ], found


def test_dump_round_trips_group_and_sessions(tmp_path: Path) -> None:
    config = dataclasses.replace(
        parse(""),
        group=GroupConfig(idle_ts_interval=0.003, repair_after=0.5, max_retained_bytes=12345),
        sessions=SessionsConfig(4096, 7, 9),
    )
    text = dump_config(config)
    assert "[group]" in text
    assert "[sessions]" in text
    assert parse_config(text) == config
    path = tmp_path / "again.toml"
    path.write_text(text, encoding="utf-8")
    assert load_config(path) == config


def test_docs_describe_every_key() -> None:
    # a new GroupConfig field must be made settable or declared internal
    internal = {"dedup_window", "max_past_views"}
    assert {f.name for f in dataclasses.fields(GroupConfig)} == set(SETTABLE_GROUP) | internal
    docs = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    for section, keys in (
        ("group", SETTABLE_GROUP),
        ("sessions", [f.name for f in dataclasses.fields(SessionsConfig)]),
    ):
        part = docs.split(f"## [{section}]", 1)[1].split("\n## ", 1)[0]
        for key in keys:
            assert f"`{key}`" in part, f"docs/config.md [{section}] does not describe {key}"


def test_limits_defaults_are_the_layers_defaults() -> None:
    # [limits] keys are copied onto OverlayConfig, SessionConfig and DaemonLimits by the
    # daemon: a file without [limits] must run the layers with their own defaults
    limits = LimitsConfig()
    sessions = SessionConfig()
    overlay = {f.name: f.default for f in dataclasses.fields(OverlayConfig)}
    copies = {
        "max_message_size": sessions.limits.max_message_size,
        "max_group_name": sessions.limits.max_group_name,
        "max_groups_per_client": sessions.limits.max_groups_per_client,
        "max_clients": sessions.max_clients,
        "handshake_timeout": sessions.handshake_timeout,
        "max_pending_handshakes": sessions.max_pending_handshakes,
        "block_timeout": sessions.block_timeout,
        "max_dests_per_packet": overlay["max_dests_per_packet"],
        "window_messages": overlay["window_messages"],
    }
    assert {f.name for f in dataclasses.fields(LimitsConfig)} == set(copies)
    assert {name: getattr(limits, name) for name in copies} == copies


def test_the_complete_example_of_the_docs_parses() -> None:
    docs = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    example = docs.split("## A complete example", 1)[1].split("```toml\n", 1)[1]
    config = parse_config(example.split("```", 1)[0], "docs/config.md")
    assert config.group.idle_ts_interval == 0.02
    assert config.sessions.max_backlog == 128 * 2**20
