"""The client-socket checks of `meshcast.runtime.sessions`: loopback, tokens, socket group."""

from __future__ import annotations

import grp
import os

import pytest

from meshcast.errors import ConfigError
from meshcast.runtime.sessions import check_client_access, is_loopback, socket_group_id


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),  # every interface: not loopback-only
        ("::", False),
        ("10.0.0.5", False),
        ("example.org", False),  # never resolved: not known to be loopback
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_port_beyond_loopback_needs_tokens() -> None:
    check_client_access(None, has_tokens=False)  # no TCP listener
    check_client_access("127.0.0.1", has_tokens=False)
    check_client_access("0.0.0.0", has_tokens=True)
    with pytest.raises(ConfigError, match=r"0\.0\.0\.0 is not loopback") as info:
        check_client_access("0.0.0.0", has_tokens=False, source="c.toml")
    assert (info.value.key, info.value.source) == ("clients.token_file", "c.toml")


def test_socket_group_id() -> None:
    try:
        name = grp.getgrgid(os.getgid()).gr_name
    except KeyError:
        pytest.skip("the primary group has no name")
    assert socket_group_id(name) == os.getgid()
    with pytest.raises(ConfigError, match="no group named 'no-such-group-mc'") as info:
        socket_group_id("no-such-group-mc")
    assert info.value.key == "clients.socket_group"
