"""AccessPolicy: token lookup and first-match rules, with the defaults of docs/security.md."""

from __future__ import annotations

import pytest

from meshcast.errors import ConfigError
from meshcast.group.access import (
    AccessPolicy,
    AccessRule,
    Operation,
    Principal,
    operations_of,
)

JOIN, SEND = Operation.JOIN, Operation.SEND
TOKENS = {"readers": "r" * 20, "writers": "w" * 20}


def test_authenticate_names_the_token_and_refuses_anything_else() -> None:
    policy = AccessPolicy(TOKENS)
    assert policy.authenticate("r" * 20) == "readers"
    assert policy.authenticate("w" * 20) == "writers"
    assert policy.authenticate("r" * 19) is None
    assert policy.authenticate("r" * 21) is None
    assert policy.authenticate("") is None
    assert AccessPolicy().authenticate("r" * 20) is None


def test_without_rules_everyone_may_do_everything() -> None:
    policy = AccessPolicy(TOKENS)
    for who in (Principal("a"), Principal("a", "readers", remote=True)):
        assert policy.allowed(who, "any.group") == {JOIN, SEND}


def test_first_matching_rule_wins_and_read_is_join_without_send() -> None:
    rules = (
        AccessRule(("metrics.*",), operations_of(["read"]), clients=("monitor-*",)),
        AccessRule(("metrics.cpu",), operations_of(["join", "send"])),  # shadowed for monitors
        AccessRule(("secret",), frozenset()),  # a deny rule
        AccessRule(("*",), operations_of(["send"]), tokens=("writers",)),
    )
    policy = AccessPolicy(TOKENS, rules)
    monitor = Principal("monitor-1")
    assert policy.decide(monitor, "metrics.cpu") == (frozenset({JOIN}), 0)
    assert policy.decide(Principal("alice"), "metrics.cpu") == (frozenset({JOIN, SEND}), 1)
    assert policy.decide(Principal("alice"), "secret") == (frozenset(), 2)
    # local sessions fall back to everything, remote ones to nothing once rules exist
    assert policy.decide(Principal("alice"), "chat") == (frozenset({JOIN, SEND}), None)
    assert policy.decide(Principal("alice", "readers", remote=True), "chat") == (frozenset(), None)
    writer = Principal("bot", "writers", remote=True)
    assert policy.decide(writer, "chat") == (frozenset({SEND}), 3)
    assert policy.decide(writer, "secret") == (frozenset(), 2)


def test_globs_are_case_sensitive_and_match_whole_names() -> None:
    rule = AccessRule(("m?trics.[ab]*",), frozenset({JOIN}), clients=("Mon*",))
    assert rule.matches("Monitor", None, "metrics.a1")
    assert not rule.matches("monitor", None, "metrics.a1")  # case
    assert not rule.matches("Monitor", None, "metrics.c1")
    assert not rule.matches("Monitor", None, "xmetrics.a1")  # anchored at both ends
    assert rule.matches("Mon", None, "mxtrics.b")


def test_token_selector_needs_that_token() -> None:
    rule = AccessRule(("*",), frozenset({SEND}), tokens=("writers",))
    assert rule.matches("x", "writers", "g")
    assert not rule.matches("x", "readers", "g")
    assert not rule.matches("x", None, "g")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"groups": ()}, "at least one group pattern"),
        ({"groups": ("*",), "clients": ()}, "clients is empty"),
        ({"groups": ("*",), "tokens": ()}, "tokens is empty"),
    ],
)
def test_rule_refuses_empty_selectors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        AccessRule(allow=frozenset(), **kwargs)  # type: ignore[arg-type]
    assert info.value.key in kwargs


def test_operations_of_refuses_unknown_words() -> None:
    assert operations_of(["read", "join"]) == {JOIN}
    assert operations_of([]) == frozenset()
    with pytest.raises(ValueError, match="unknown operation 'write'; allowed: join, read, send"):
        operations_of(["write"])


def test_tokens_stay_out_of_repr() -> None:
    assert "r" * 20 not in repr(AccessPolicy(TOKENS))
