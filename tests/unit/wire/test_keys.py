"""Cluster keys (meshcast.wire.keys): the text format, key ids, fingerprints, the ring."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcast.errors import ConfigError
from meshcast.wire.keys import KEY_PREFIX, KEY_SIZE, ClusterKey, KeyRing, format_key, parse_key

SECRET = bytes(range(32))


@given(st.binary(min_size=KEY_SIZE, max_size=KEY_SIZE))
def test_format_then_parse_gives_the_same_key(secret: bytes) -> None:
    key = ClusterKey(secret)
    again = parse_key(format_key(key))
    assert again == key
    assert (again.key_id, again.fingerprint) == (key.key_id, key.fingerprint)


def test_the_text_is_one_prefixed_hex_line_after_comments() -> None:
    text = format_key(ClusterKey(SECRET))
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [f"{KEY_PREFIX} {SECRET.hex()}"]
    assert text.endswith("\n")


def test_comments_blank_lines_spaces_and_upper_case_hex_are_accepted() -> None:
    text = f"\n# a comment\n\n   {KEY_PREFIX}   {SECRET.hex().upper()}  \n# more\n"
    assert parse_key(text).secret == SECRET


def test_key_id_and_fingerprint_are_stable_and_never_show_the_secret() -> None:
    key = ClusterKey(SECRET)
    # pinned: daemons of different versions must agree on a key's id, and operators
    # compare fingerprints across hosts (BLAKE2s of the secret, personalised "mc-keyid")
    assert (key.key_id, key.fingerprint) == (138, "8a591b2cfa184434")
    assert (ClusterKey(bytes(32)).key_id, ClusterKey(bytes(32)).fingerprint) == (
        190,
        "be46a9c41c801b30",
    )
    assert SECRET.hex() not in repr(key)
    other = ClusterKey(bytes(32))
    assert other.fingerprint != key.fingerprint


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected one 'meshcast-cluster-key-v1 <hex>' line, found 0"),
        ("# only a comment\n", "found 0"),
        (f"{KEY_PREFIX} {SECRET.hex()}\n{KEY_PREFIX} {SECRET.hex()}\n", "found 2"),
        (f"meshcast-cluster-key-v2 {SECRET.hex()}\n", "not a meshcast key file"),
        (SECRET.hex(), "not a meshcast key file"),
        (f"{KEY_PREFIX} {'zz' * 32}\n", "the key is not hexadecimal"),
        (f"{KEY_PREFIX} {SECRET.hex()[:-1]}\n", "the key is not hexadecimal"),
        (f"{KEY_PREFIX} {SECRET.hex()[:-2]}\n", "the key has 31 bytes, a cluster key has 32"),
        (f"{KEY_PREFIX} {SECRET.hex()}00\n", "the key has 33 bytes"),
        (f"{KEY_PREFIX}\n", "the key has 0 bytes"),
    ],
)
def test_bad_texts_are_config_errors_naming_the_source(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_key(text, source="/etc/meshcast/cluster.key")
    assert message in str(caught.value)
    assert str(caught.value).startswith("/etc/meshcast/cluster.key: ")


@given(st.text(max_size=200))
def test_any_text_is_a_key_or_a_config_error(text: str) -> None:
    try:
        key = parse_key(text)
    except ConfigError:
        return
    assert len(key.secret) == KEY_SIZE


def test_a_key_is_exactly_32_bytes() -> None:
    for size in (0, 16, 31, 33, 64):
        with pytest.raises(ValueError, match="32 bytes"):
            ClusterKey(bytes(size))


def test_the_ring_puts_the_next_key_first() -> None:
    current, upcoming = ClusterKey(SECRET), ClusterKey(bytes(32))
    assert KeyRing.of(current).keys == (current,)
    ring = KeyRing.of(current, upcoming)
    assert ring.keys == (upcoming, current)
    assert ring.newest == upcoming
    assert current in ring
    assert upcoming in ring
    assert ClusterKey(b"\x01" * 32) not in ring
    # the same key twice (next_key_file names the current one): one key
    assert KeyRing.of(current, ClusterKey(SECRET)).keys == (current,)
    with pytest.raises(ValueError, match="at least one key"):
        KeyRing(())


def test_candidates_are_the_keys_with_that_id_newest_first() -> None:
    keys = [ClusterKey(i.to_bytes(2, "big") * 16) for i in range(600)]
    by_id: dict[int, list[ClusterKey]] = {}
    for key in keys:
        by_id.setdefault(key.key_id, []).append(key)
    # a one-byte id collides now and then: both keys must be offered, newest first
    shared = next(group for group in by_id.values() if len(group) >= 2)
    ring = KeyRing.of(shared[0], shared[1])
    assert ring.candidates(shared[0].key_id) == [shared[1], shared[0]]
    single = KeyRing.of(keys[0])
    assert single.candidates(keys[0].key_id) == [keys[0]]
    unused = next(i for i in range(256) if i != keys[0].key_id)
    assert single.candidates(unused) == []
