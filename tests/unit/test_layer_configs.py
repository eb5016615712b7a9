"""The protocol layers' config dataclasses: a bad value is a `ConfigError` naming the
field (invalid configuration, never a `UsageError`: no API was misused)."""

from __future__ import annotations

import math

import pytest

from meshcast.errors import ConfigError, UsageError
from meshcast.group import GroupConfig
from meshcast.group.sessions import SessionConfig
from meshcast.ids import NodeId
from meshcast.link import LinkConfig
from meshcast.overlay.node import Neighbour, OverlayConfig

ONE, TWO = NodeId(1), NodeId(2)


def overlay(**fields: object) -> OverlayConfig:
    return OverlayConfig(
        neighbours={TWO: Neighbour(1.0, 1e6)},
        upload_bps={ONE: 1e6, TWO: 1e6},
        **fields,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("policy", "widest", "unknown routing policy 'widest'"),
        ("max_dests_per_packet", 0, "positive integer"),
        ("window_messages", -1, "positive integer"),
        ("max_outbox_messages", 0, "positive integer"),
        ("feedback_every", 0, "positive integer"),
        ("dedup_window", 0, "positive integer"),
        ("view_settle_interval", 0.0, "positive number of seconds"),
        ("feedback_interval", math.nan, "positive number of seconds"),
        ("lsa_refresh_interval", 0.0, "positive number of seconds"),
        ("rate_share", 1.5, "(0, 1]"),
        ("rate_change_threshold", 1.0, "[0, 1)"),
        ("allowed_links", frozenset({(TWO, ONE)}), "allowed link 2-1"),
    ],
)
def test_overlay_config_names_the_bad_field(field: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        overlay(**{field: value})
    assert info.value.key == field
    assert words in str(info.value)
    assert not isinstance(info.value, UsageError)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_clients", 0),
        ("max_backlog", 0),
        ("max_pending_handshakes", 0),
        ("status_max_groups", -1),
        ("status_max_members", -1),
        ("block_timeout", 0.0),
        ("handshake_timeout", math.inf),
    ],
)
def test_session_config_names_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        SessionConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.key == field
    assert repr(value) in str(info.value)


def test_link_and_group_configs_raise_config_error() -> None:
    with pytest.raises(ConfigError) as link:
        LinkConfig(mtu=10)
    assert link.value.key == "link.mtu"
    with pytest.raises(ConfigError) as group:
        GroupConfig(max_held_messages=0)
    assert group.value.key == "max_held_messages"


def test_the_defaults_are_valid() -> None:
    assert overlay().window_messages >= 1
    assert SessionConfig(status_max_groups=0, status_max_members=0).max_clients >= 1
