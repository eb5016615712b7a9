"""Cluster configuration: the TOML schema, every validation error, units and the default."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from fractions import Fraction
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcast.config import (
    DEFAULT_SOURCE,
    ROUTING_POLICIES,
    ClusterConfig,
    DaemonSpec,
    Emulation,
    LimitsConfig,
    LinkSpec,
    MembershipConfig,
    SecurityConfig,
    SiteSpec,
    default_config,
    dump_config,
    load_config,
    parse_config,
    parse_duration,
    parse_rate,
    parse_size,
)
from meshcast.errors import ConfigError
from meshcast.link.config import LinkConfig

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "test.toml"

# A small valid cluster: D1, D2 in site east, D3 in site west. Values are raw TOML.
SITES = ["east", "west"]
DAEMONS: list[dict[str, str]] = [
    {
        "name": '"D1"',
        "host": '"127.0.0.1"',
        "port": "5001",
        "site": '"east"',
        "upload": '"100Mbit"',
        "download": '"100Mbit"',
    },
    {
        "name": '"D2"',
        "host": '"127.0.0.2"',
        "port": "5002",
        "site": '"east"',
        "upload": '"50Mbit"',
        "download": '"80Mbit"',
    },
    {
        "name": '"D3"',
        "host": '"127.0.0.3"',
        "port": "5003",
        "site": '"west"',
        "upload": '"10Mbit"',
        "download": '"20Mbit"',
    },
]


def render(
    changes: Mapping[int, Mapping[str, str | None]] | None = None,
    tail: str = "",
    sites: list[str] | None = None,
    head: str = "",
) -> str:
    """The small cluster as TOML; `changes[i][key]` replaces (None: removes) a daemon's key."""
    changes = changes or {}
    parts = [head]
    parts += [f'[[sites]]\nname = "{site}"\n' for site in (SITES if sites is None else sites)]
    for i, daemon in enumerate(DAEMONS):
        values: dict[str, str | None] = {**daemon, **changes.get(i, {})}
        body = "".join(f"{k} = {v}\n" for k, v in values.items() if v is not None)
        parts.append(f"[[daemons]]\n{body}")
    parts.append(tail)
    return "\n".join(parts)


def parse(text: str) -> ClusterConfig:
    return parse_config(text, SOURCE)


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def pair(link: LinkSpec) -> tuple[str, str]:
    return (link.a, link.b)


# ---------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------

RATE_UNITS = {"bit": 1, "kbit": 10**3, "Mbit": 10**6, "Gbit": 10**9, "Tbit": 10**12}
SIZE_UNITS = {
    "B": 1,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
    "kB": 10**3,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}
DURATION_UNITS = {
    "us": Fraction(1, 10**6),
    "µs": Fraction(1, 10**6),
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "min": Fraction(60),
}
SPACE = st.sampled_from(["", " "])


@given(st.integers(0, 10**6), st.sampled_from(sorted(RATE_UNITS)), SPACE, st.booleans())
def test_rate_strings_are_bits_per_second(n: int, unit: str, space: str, lower: bool) -> None:
    spelt = unit.lower() if lower else unit
    assert parse_rate(f"{n}{space}{spelt}") == n * RATE_UNITS[unit]


@given(
    st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False, allow_infinity=False),
    st.sampled_from(sorted(RATE_UNITS)),
)
def test_fractional_rates(number: Decimal, unit: str) -> None:
    text = f"{number}{unit}"
    expected = float(Fraction(str(number)) * RATE_UNITS[unit])
    assert parse_rate(text) == expected


@given(st.integers(0, 2**20), st.sampled_from(sorted(SIZE_UNITS)), SPACE)
def test_size_strings_are_exact_bytes(n: int, unit: str, space: str) -> None:
    assert parse_size(f"{n}{space}{unit}") == n * SIZE_UNITS[unit]


@given(st.integers(0, 10**6), st.sampled_from(sorted(DURATION_UNITS)), SPACE)
def test_duration_strings_are_seconds(n: int, unit: str, space: str) -> None:
    assert parse_duration(f"{n}{space}{unit}") == float(n * DURATION_UNITS[unit])


@given(st.one_of(st.integers(0, 2**53), st.floats(0, 1e15)))
def test_plain_numbers_are_base_units(number: float) -> None:
    assert parse_rate(number) == float(number)
    assert parse_duration(number) == float(number)


@given(st.integers(0, 2**62))
def test_plain_integers_are_bytes(number: int) -> None:
    assert parse_size(number) == number


@given(st.text(max_size=20))
def test_unit_parsers_raise_only_config_error(text: str) -> None:
    for parser in (parse_rate, parse_size, parse_duration):
        outcome: float | ConfigError
        try:
            outcome = parser(text, "k")
        except ConfigError as exc:
            outcome = exc
        if isinstance(outcome, ConfigError):
            assert outcome.key == "k"
        else:
            assert math.isfinite(outcome)


def test_unit_examples() -> None:
    assert parse_rate("1.5 Gbit") == 1.5e9
    assert parse_rate("100mbit") == 100e6
    assert parse_rate("1e3kbit") == 1e6
    assert parse_size("1.5KiB") == 1536
    assert parse_size("16MiB") == 16 * 2**20
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("250us") == pytest.approx(250e-6)
    assert parse_duration("2min") == 120.0


@pytest.mark.parametrize(
    ("parser", "value", "fragment"),
    [
        (parse_rate, "10", "has no unit"),
        (parse_rate, "Mbit", "cannot parse"),
        (parse_rate, "-5Mbit", "cannot parse"),
        (parse_rate, "10 Mbps", "bps spellings are ambiguous"),
        (parse_rate, "10MB/s", "bps spellings are ambiguous"),
        (parse_rate, "10MiB", "unknown rate unit 'MiB'"),
        (parse_rate, True, "must be a number or a string"),
        (parse_rate, [1], "must be a number or a string"),
        (parse_rate, math.inf, "must be finite"),
        (parse_rate, math.nan, "must be finite"),
        (parse_size, "16Mb", "unknown size unit 'Mb'"),
        (parse_size, "16mib", "unknown size unit"),
        (parse_size, "16Mbit", "unknown size unit"),
        (parse_size, "1.3B", "not a whole number of bytes"),
        (parse_size, "1024", "has no unit"),
        (parse_size, 1.5, "must be an integer (bytes)"),
        (parse_size, False, "must be an integer (bytes)"),
        (parse_duration, "20 msec", "unknown duration unit 'msec'"),
        (parse_duration, "1h", "unknown duration unit"),
        (parse_duration, "0.5", "has no unit"),
        (parse_duration, {}, "must be a number or a string"),
    ],
)
def test_unit_errors(parser: object, value: object, fragment: str) -> None:
    assert callable(parser)
    with pytest.raises(ConfigError, match=re.escape(fragment)) as info:
        parser(value, "some.key")
    assert info.value.key == "some.key"


# ---------------------------------------------------------------------------------------
# The embedded default
# ---------------------------------------------------------------------------------------


def test_default_is_six_daemons_in_three_sites_on_loopback() -> None:
    config = default_config()
    assert config.source == DEFAULT_SOURCE
    assert [d.name for d in config.daemons] == ["D1", "D2", "D3", "D4", "D5", "D6"]
    assert [d.node_id for d in config.daemons] == [1, 2, 3, 4, 5, 6]
    assert [d.host for d in config.daemons] == [f"127.0.0.{i}" for i in range(1, 7)]
    assert len({d.port for d in config.daemons}) == 6
    assert [s.name for s in config.sites] == ["east", "central", "west"]
    assert [[d.name for d in config.site_members(s.name)] for s in config.sites] == [
        ["D1", "D2"],
        ["D3", "D4"],
        ["D5", "D6"],
    ]
    assert len({(d.upload_bps, d.download_bps) for d in config.daemons}) == 3  # heterogeneous
    assert config.routing == "shortest-path"


def test_default_links_full_mesh_inside_sites_and_emulated_wan_between_gateways() -> None:
    config = default_config()
    assert [pair(link) for link in config.links] == [
        ("D1", "D2"),
        ("D1", "D3"),
        ("D1", "D5"),
        ("D3", "D4"),
        ("D3", "D5"),
        ("D5", "D6"),
    ]
    for link in config.links:
        same_site = config.daemon(link.a).site == config.daemon(link.b).site
        if same_site:
            assert link.emulation is None
        else:
            assert link.emulation is not None
            assert 0.010 <= link.emulation.delay <= 0.040
    # Shortest path D1 -> D5 goes through D3: 10 + 20 < 40.
    weights = {pair(link): link.weight for link in config.links}
    assert weights["D1", "D3"] + weights["D3", "D5"] < weights["D1", "D5"]


def test_default_is_shipped_as_package_data_and_loads_as_a_file() -> None:
    resource = resources.files("meshcast").joinpath("default-cluster.toml")
    assert resource.is_file()
    path = ROOT / "src" / "meshcast" / "default-cluster.toml"
    from_file = load_config(path)
    assert from_file == default_config()
    assert from_file.source == str(path)


def test_default_round_trips_through_dump() -> None:
    config = default_config()
    again = parse_config(dump_config(config))
    assert again == config
    assert again.links == config.links
    assert dump_config(again).splitlines()[3:] == dump_config(config).splitlines()[3:]


# ---------------------------------------------------------------------------------------
# Loading: defaults, ids, generated and explicit links
# ---------------------------------------------------------------------------------------


def test_minimal_file_takes_documented_defaults() -> None:
    config = parse(render())
    assert config.name == "meshcast"
    assert config.routing == "shortest-path"
    assert config.link == LinkConfig()
    assert config.membership == MembershipConfig()
    assert config.security == SecurityConfig()
    assert config.limits == LimitsConfig()
    assert config.daemon("D2") == DaemonSpec("D2", 2, "127.0.0.2", 5002, "east", 50e6, 80e6)
    assert config.daemon("D2").address == ("127.0.0.2", 5002)


@pytest.mark.parametrize("policy", ROUTING_POLICIES)
def test_routing_policies(policy: str) -> None:
    config = parse(render(head=f'[cluster]\nname = "c-1"\nrouting = "{policy}"\n'))
    assert (config.name, config.routing) == ("c-1", policy)


def test_node_ids_follow_file_order_around_explicit_ids() -> None:
    config = parse(render({0: {"id": "2"}}))
    assert [d.node_id for d in config.daemons] == [2, 1, 3]
    assert config.by_id(2).name == "D1"
    config = parse(render({2: {"id": "1000"}}))
    assert [d.node_id for d in config.daemons] == [1, 2, 1000]


def test_generated_links_default_full_in_sites_gateways_between() -> None:
    config = parse(render())
    links = {pair(link): link for link in config.links}
    assert sorted(links) == [("D1", "D2"), ("D1", "D3")]
    assert links["D1", "D2"].weight == 1.0
    assert links["D1", "D3"].weight == 10.0
    # default bandwidth: min(upload a, download b, upload b, download a)
    assert links["D1", "D2"].bandwidth_bps == 50e6
    assert links["D1", "D3"].bandwidth_bps == 10e6


def test_generated_links_full_between_sites_with_weights_and_emulation() -> None:
    tail = (
        '[links]\nwithin_sites = "none"\nbetween_sites = "full"\n'
        "site_weight = 2\nwan_weight = 7.5\n"
        'wan_emulate = { delay = "5ms", loss = 0.01, rate = "8Mbit" }\n'
        '[[links.edge]]\na = "D2"\nb = "D1"\n'
    )
    config = parse(render(tail=tail))
    links = {pair(link): link for link in config.links}
    assert sorted(links) == [("D1", "D2"), ("D1", "D3"), ("D2", "D3")]
    assert links["D1", "D3"].weight == 7.5
    assert links["D1", "D3"].emulation == Emulation(delay=0.005, loss=0.01, rate_bps=8e6)
    assert links["D1", "D2"].weight == 2.0  # explicit edge inside a site: site_weight
    assert links["D1", "D2"].emulation is None  # ... and site_emulate (none)


def test_site_gateway_choice_and_no_between_links() -> None:
    gateways = parse(
        render(
            sites=[], head='[[sites]]\nname = "east"\ngateway = "D2"\n\n[[sites]]\nname = "west"\n'
        )
    )
    assert [pair(link) for link in gateways.links] == [("D1", "D2"), ("D2", "D3")]
    assert gateways.sites[0] == SiteSpec("east", gateway="D2")


def test_explicit_edges_override_generated_ones() -> None:
    tail = (
        "[links]\nwan_emulate = { delay_ms = 30 }\nsite_emulate = { jitter_ms = 1 }\n"
        '[[links.edge]]\na = "D3"\nb = "D1"\nweight = 3\nbandwidth = "1Mbit"\n'
        '[[links.edge]]\na = "D2"\nb = "D3"\nemulate = {}\n'
        '[[links.edge]]\na = "D2"\nb = "D1"\nemulate = { delay = 0.001, jitter = "0.5ms" }\n'
    )
    config = parse(render(tail=tail))
    links = {pair(link): link for link in config.links}
    assert sorted(links) == [("D1", "D2"), ("D1", "D3"), ("D2", "D3")]
    assert links["D1", "D3"] == LinkSpec("D1", "D3", 3.0, 1e6, Emulation(delay=0.030))
    assert links["D2", "D3"] == LinkSpec("D2", "D3", 10.0, 10e6, None)  # {} switches it off
    assert links["D1", "D2"].emulation == Emulation(delay=0.001, jitter=0.0005)


def test_neighbours_of_generated_and_explicit_links() -> None:
    tail = '[[links.edge]]\na = "D2"\nb = "D3"\nweight = 4\n'
    config = parse(render(tail=tail))
    assert [(d.name, link.weight) for d, link in config.neighbours("D1")] == [
        ("D2", 1.0),
        ("D3", 10.0),
    ]
    assert [(d.name, link.weight) for d, link in config.neighbours("D3")] == [
        ("D1", 10.0),
        ("D2", 4.0),
    ]
    for name in ("D1", "D2", "D3"):
        for neighbour, link in config.neighbours(name):
            assert {link.a, link.b} == {name, neighbour.name}
            assert link.other(name) == neighbour.name


def test_single_daemon_needs_no_links() -> None:
    config = parse(
        '[[sites]]\nname = "s"\n[[daemons]]\nname = "solo"\nhost = "::1"\n'
        'port = 1\nsite = "s"\nupload = 1\ndownload = 1\n'
    )
    assert config.links == ()
    assert config.neighbours("solo") == []


def test_lookups_name_what_is_missing() -> None:
    config = parse(render())
    with pytest.raises(ConfigError, match="unknown daemon 'D9'; daemons are D1, D2, D3") as info:
        config.daemon("D9")
    assert info.value.source == SOURCE
    with pytest.raises(ConfigError, match="no daemon has id 7"):
        config.by_id(7)
    with pytest.raises(ConfigError, match="unknown daemon 'D9'"):
        config.neighbours("D9")


def test_with_ports() -> None:
    config = parse(render())
    moved = config.with_ports({"D1": 40001, "D3": 40003})
    assert [d.port for d in moved.daemons] == [40001, 5002, 40003]
    assert moved.source == SOURCE
    assert moved.links == config.links
    assert moved.daemon("D3").address == ("127.0.0.3", 40003)
    assert config.daemon("D1").port == 5001  # the original is unchanged
    with pytest.raises(ConfigError, match="unknown daemon 'D7'"):
        config.with_ports({"D7": 1})
    with pytest.raises(ConfigError, match=r"must be in 1\.\.65535") as info:
        config.with_ports({"D1": 0})
    assert info.value.key == "port"
    shared = parse(render({1: {"host": '"127.0.0.1"'}}))
    with pytest.raises(ConfigError, match="already used by daemons") as info:
        shared.with_ports({"D2": 5001})
    assert info.value.key == "daemons[1].port"


def test_link_section_maps_onto_link_config_with_units() -> None:
    tail = (
        "[link]\n"
        'mtu = "1.5KiB"\nrate = "20Mbit"\nburst_bytes = "8KiB"\nmax_unacked_packets = 100\n'
        'max_send_queue_bytes = "64MiB"\nmax_message_size = "1MiB"\nack_delay_interval = "5ms"\n'
        'ack_every_packets = 4\nnack_delay_interval = 0.002\ninitial_rtt = "100ms"\n'
        'min_renack_interval = "20ms"\nheartbeat_interval = "1s"\nhello_interval = 0.5\n'
        "failure_rounds = 3\nidle_duplicate_retransmits = false\n"
        'max_reassembly_bytes = "2MiB"\n'
        '[limits]\nmax_message_size = "1MiB"\n'
    )
    link = parse(render(tail=tail)).link
    assert link == LinkConfig(
        mtu=1536,
        rate_bps=20e6,
        burst_bytes=8192,
        max_unacked_packets=100,
        max_send_queue_bytes=64 * 2**20,
        max_message_size=2**20,
        ack_delay_interval=0.005,
        ack_every_packets=4,
        nack_delay_interval=0.002,
        initial_rtt=0.1,
        min_renack_interval=0.02,
        heartbeat_interval=1.0,
        hello_interval=0.5,
        failure_rounds=3,
        idle_duplicate_retransmits=False,
        max_reassembly_bytes=2 * 2**20,
    )


def test_membership_limits_and_security_sections(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    (tmp_path / "keys").mkdir()
    (tmp_path / "cluster.toml").write_text(
        render(
            tail='[membership]\nhello_interval = "250ms"\nlsa_refresh_interval = 30\n'
            'view_settle_interval = "100ms"\nfailure_timeout = "2s"\n'
            '[limits]\nmax_message_size = "1MiB"\nmax_dests_per_packet = 8\n'
            "window_messages = 10\nmax_clients = 2\nmax_groups_per_client = 3\n"
            'max_group_name = 32\nblock_timeout = "2s"\n'
            '[security]\nkey_file = "cluster.key"\nnext_key_file = "keys/new.key"\n'
        ),
        encoding="utf-8",
    )
    config = load_config(tmp_path / "cluster.toml")
    assert config.membership == MembershipConfig(0.25, 30.0, 0.1, 2.0)
    assert config.limits == LimitsConfig(2**20, 8, 10, 2, 3, 32, block_timeout=2.0)
    # relative key files are relative to the configuration file, not to the cwd; they
    # are read by the daemon, so a file that only reads the configuration needs no key
    assert config.security == SecurityConfig(
        key_file=str(key), next_key_file=str(tmp_path / "keys" / "new.key")
    )


def test_security_insecure_and_daemon_check() -> None:
    assert parse(render(tail="[security]\ninsecure = true\n")).security == SecurityConfig(
        insecure=True
    )
    SecurityConfig(insecure=True).check_daemon()
    SecurityConfig(key_file="/k").check_daemon()
    with pytest.raises(ConfigError) as caught:
        parse(render()).security.check_daemon("cluster.toml")
    message = str(caught.value)
    assert message.startswith("cluster.toml:security.key_file: a daemon needs a cluster key")
    assert "meshcast keygen FILE" in message
    assert 'key_file = "FILE"' in message
    assert "insecure = true" in message


def test_hosts_are_canonical_ip_addresses() -> None:
    config = parse(render({0: {"host": '"::0001"'}, 1: {"host": '"localhost"'}}))
    assert [d.host for d in config.daemons] == ["::1", "localhost", "127.0.0.3"]


# ---------------------------------------------------------------------------------------
# Every validation error names the file, the key and what is wrong
# ---------------------------------------------------------------------------------------

EDGE = '[[links.edge]]\na = "D1"\nb = "D2"\n'

ERRORS: list[tuple[str, str, str, str]] = [
    # (id, TOML text, key, fragment of the message)
    ("toml-syntax", render(tail="x = = 1\n"), "", "invalid TOML: Invalid value (at line"),
    ("top-typo", render(tail='[[daemon]]\nname = "D4"\n'), "daemon", "did you mean 'daemons'"),
    ("top-unknown", render(tail="[zzz]\n"), "zzz", "expected one of: cluster, sites"),
    ("cluster-not-table", "cluster = 3\n" + render(), "cluster", "must be a table, got integer 3"),
    ("cluster-typo", render(head='[cluster]\nnmae = "x"\n'), "cluster.nmae", "did you mean 'name'"),
    ("cluster-name-type", render(head="[cluster]\nname = 3\n"), "cluster.name", "must be a string"),
    (
        "cluster-name-bad",
        render(head='[cluster]\nname = "my cluster"\n'),
        "cluster.name",
        "letters, digits",
    ),
    (
        "routing",
        render(head='[cluster]\nrouting = "fastest"\n'),
        "cluster.routing",
        "must be one of shortest-path, fanout, max-throughput, got 'fastest'",
    ),
    (
        "sites-table",
        render(sites=[], head='[sites]\nname = "east"\n'),
        "sites",
        "must be an array of tables ([[sites]] entries)",
    ),
    (
        "site-typo",
        render(tail='[[sites]]\nname = "x"\ncolour = "red"\n'),
        "sites[2].colour",
        "unknown key",
    ),
    (
        "site-no-name",
        render(tail='[[sites]]\ngateway = "D1"\n'),
        "sites[2].name",
        "missing required key",
    ),
    (
        "site-dup",
        render(sites=["east", "west", "east"]),
        "sites[2].name",
        "duplicate site name 'east' (also sites[0])",
    ),
    ("site-name-bad", render(sites=["east", "west", ""]), "sites[2].name", "letters, digits"),
    (
        "gateway-unknown",
        render(
            sites=[], head='[[sites]]\nname = "east"\ngateway = "D9"\n[[sites]]\nname = "west"\n'
        ),
        "sites[0].gateway",
        "unknown daemon 'D9'",
    ),
    (
        "gateway-other-site",
        render(
            sites=[], head='[[sites]]\nname = "east"\ngateway = "D3"\n[[sites]]\nname = "west"\n'
        ),
        "sites[0].gateway",
        "daemon 'D3' is in site 'west', not 'east'",
    ),
    (
        "no-daemons",
        '[[sites]]\nname = "s"\n',
        "daemons",
        "at least one [[daemons]] entry is required",
    ),
    ("empty-daemons", "daemons = []\n", "daemons", "at least one [[daemons]] entry is required"),
    ("daemons-table", '[daemons]\nname = "x"\n', "daemons", "must be an array of tables"),
    ("daemon-typo", render({1: {"prot": "1"}}), "daemons[1].prot", "did you mean 'port'"),
    ("daemon-no-name", render({1: {"name": None}}), "daemons[1].name", "missing required key"),
    ("daemon-no-host", render({1: {"host": None}}), "daemons[1].host", "missing required key"),
    ("daemon-no-port", render({1: {"port": None}}), "daemons[1].port", "missing required key"),
    ("daemon-no-site", render({1: {"site": None}}), "daemons[1].site", "missing required key"),
    (
        "daemon-no-upload",
        render({1: {"upload": None}}),
        "daemons[1].upload",
        "missing required key",
    ),
    (
        "daemon-no-download",
        render({1: {"download": None}}),
        "daemons[1].download",
        "missing required key",
    ),
    ("daemon-name-bad", render({1: {"name": '"D 2"'}}), "daemons[1].name", "letters, digits"),
    ("daemon-name-long", render({1: {"name": '"' + "x" * 65 + '"'}}), "daemons[1].name", "1 to 64"),
    (
        "daemon-name-dup",
        render({1: {"name": '"D1"'}}),
        "daemons[1].name",
        "duplicate daemon name 'D1' (also daemons[0])",
    ),
    (
        "port-string",
        render({1: {"port": '"5002"'}}),
        "daemons[1].port",
        "must be an integer, got string '5002'",
    ),
    (
        "port-bool",
        render({1: {"port": "true"}}),
        "daemons[1].port",
        "must be an integer, got boolean True",
    ),
    (
        "port-float",
        render({1: {"port": "5002.0"}}),
        "daemons[1].port",
        "must be an integer, got float",
    ),
    ("port-zero", render({1: {"port": "0"}}), "daemons[1].port", "must be in 1..65535, got 0"),
    (
        "port-high",
        render({1: {"port": "65536"}}),
        "daemons[1].port",
        "must be in 1..65535, got 65536",
    ),
    ("id-zero", render({1: {"id": "0"}}), "daemons[1].id", "must be in 1..4294967295"),
    ("id-high", render({1: {"id": "4294967296"}}), "daemons[1].id", "must be in 1..4294967295"),
    ("id-type", render({1: {"id": '"2"'}}), "daemons[1].id", "must be an integer"),
    (
        "id-dup",
        render({0: {"id": "5"}, 1: {"id": "5"}}),
        "daemons[1].id",
        "duplicate node id 5 (also daemons[0])",
    ),
    (
        "address-dup",
        render({1: {"host": '"127.0.0.1"', "port": "5001"}}),
        "daemons[1].port",
        "address 127.0.0.1:5001 is already used by daemons[0]",
    ),
    (
        "address-localhost",
        render({1: {"host": '"localhost"', "port": "5001"}}),
        "daemons[1].port",
        "already used by daemons[0]",
    ),
    (
        "host-name",
        render({1: {"host": '"example.com"'}}),
        "daemons[1].host",
        "must be an IP address or 'localhost' (host names are not resolved)",
    ),
    (
        "host-any",
        render({1: {"host": '"0.0.0.0"'}}),
        "daemons[1].host",
        "other daemons can send to",
    ),
    (
        "host-multicast",
        render({1: {"host": '"224.0.0.1"'}}),
        "daemons[1].host",
        "other daemons can send to",
    ),
    ("host-type", render({1: {"host": "127"}}), "daemons[1].host", "must be a string"),
    (
        "site-unknown",
        render({1: {"site": '"north"'}}),
        "daemons[1].site",
        "unknown site 'north'; defined sites: east, west",
    ),
    ("site-none-defined", render(sites=[]), "daemons[0].site", "no [[sites]] are defined"),
    (
        "upload-zero",
        render({1: {"upload": "0"}}),
        "daemons[1].upload",
        "must be a positive number of bits/s",
    ),
    (
        "upload-negative",
        render({1: {"upload": "-1e6"}}),
        "daemons[1].upload",
        "must be a positive number",
    ),
    (
        "upload-unit",
        render({1: {"upload": '"fast"'}}),
        "daemons[1].upload",
        "cannot parse rate 'fast'",
    ),
    (
        "upload-bytes",
        render({1: {"upload": '"10MB/s"'}}),
        "daemons[1].upload",
        "unknown rate unit 'MB/s'",
    ),
    ("download-nan", render({1: {"download": "nan"}}), "daemons[1].download", "must be finite"),
    ("download-type", render({1: {"download": "[1]"}}), "daemons[1].download", "got array"),
    (
        "links-array",
        render(tail='[[links]]\na = "D1"\n'),
        "links",
        "explicit edges go in [[links.edge]]",
    ),
    ("links-typo", render(tail="[links]\nedges = []\n"), "links.edges", "did you mean 'edge'"),
    (
        "links-hop-key",
        render(tail="[links]\nmtu = 1400\n"),
        "links.mtu",
        "Hop link parameters go in [link]",
    ),
    (
        "within",
        render(tail='[links]\nwithin_sites = "gateways"\n'),
        "links.within_sites",
        "must be one of full, none, got 'gateways'",
    ),
    (
        "between",
        render(tail='[links]\nbetween_sites = "ring"\n'),
        "links.between_sites",
        "must be one of full, gateways, none",
    ),
    (
        "site-weight",
        render(tail="[links]\nsite_weight = 0\n"),
        "links.site_weight",
        "must be positive",
    ),
    (
        "wan-weight",
        render(tail='[links]\nwan_weight = "x"\n'),
        "links.wan_weight",
        "must be a number",
    ),
    (
        "wan-emulate-typo",
        render(tail="[links]\nwan_emulate = { dealy = 1 }\n"),
        "links.wan_emulate.dealy",
        "did you mean 'delay'",
    ),
    (
        "edge-not-array",
        render(tail="[links]\nedge = 3\n"),
        "links.edge",
        "must be an array of tables",
    ),
    (
        "edge-typo",
        render(tail=EDGE + "wieght = 1\n"),
        "links.edge[0].wieght",
        "did you mean 'weight'",
    ),
    (
        "edge-no-a",
        render(tail='[[links.edge]]\nb = "D2"\n'),
        "links.edge[0].a",
        "missing required key",
    ),
    (
        "edge-unknown-a",
        render(tail='[[links.edge]]\na = "D9"\nb = "D2"\n'),
        "links.edge[0].a",
        "unknown daemon 'D9'; daemons are D1, D2, D3",
    ),
    (
        "edge-unknown-b",
        render(tail='[[links.edge]]\na = "D1"\nb = "X"\n'),
        "links.edge[0].b",
        "unknown daemon 'X'",
    ),
    (
        "edge-self",
        render(tail='[[links.edge]]\na = "D1"\nb = "D1"\n'),
        "links.edge[0].b",
        "links daemon 'D1' to itself",
    ),
    (
        "edge-dup",
        render(tail=EDGE + '[[links.edge]]\na = "D2"\nb = "D1"\n'),
        "links.edge[1]",
        "duplicate edge D2–D1 (also links.edge[0])",
    ),
    (
        "edge-weight",
        render(tail=EDGE + "weight = -1\n"),
        "links.edge[0].weight",
        "must be a positive number",
    ),
    (
        "edge-weight-type",
        render(tail=EDGE + 'weight = "1"\n'),
        "links.edge[0].weight",
        "must be a number",
    ),
    (
        "edge-bandwidth",
        render(tail=EDGE + 'bandwidth = "1Mbyte"\n'),
        "links.edge[0].bandwidth",
        "unknown rate unit 'Mbyte'",
    ),
    (
        "edge-bandwidth-zero",
        render(tail=EDGE + 'bandwidth = "0Mbit"\n'),
        "links.edge[0].bandwidth",
        "positive",
    ),
    (
        "emulate-type",
        render(tail=EDGE + "emulate = 20\n"),
        "links.edge[0].emulate",
        "must be a table",
    ),
    (
        "emulate-both",
        render(tail=EDGE + 'emulate = { delay = "1ms", delay_ms = 1 }\n'),
        "links.edge[0].emulate.delay_ms",
        "give delay or delay_ms, not both",
    ),
    (
        "emulate-delay",
        render(tail=EDGE + "emulate = { delay = -0.1 }\n"),
        "links.edge[0].emulate.delay",
        "must be >= 0 s",
    ),
    (
        "emulate-delay-unit",
        render(tail=EDGE + 'emulate = { delay = "1 day" }\n'),
        "links.edge[0].emulate.delay",
        "unknown duration unit 'day'",
    ),
    (
        "emulate-jitter-ms",
        render(tail=EDGE + "emulate = { jitter_ms = -1 }\n"),
        "links.edge[0].emulate.jitter_ms",
        "must be >= 0 ms",
    ),
    (
        "emulate-loss",
        render(tail=EDGE + "emulate = { loss = 1.0 }\n"),
        "links.edge[0].emulate.loss",
        "must be in [0, 1)",
    ),
    (
        "emulate-loss-type",
        render(tail=EDGE + 'emulate = { loss = "1%" }\n'),
        "links.edge[0].emulate.loss",
        "must be a number",
    ),
    (
        "emulate-rate",
        render(tail=EDGE + "emulate = { rate = 0 }\n"),
        "links.edge[0].emulate.rate",
        "positive",
    ),
    (
        "disconnected",
        render(tail='[links]\nbetween_sites = "none"\n'),
        "links",
        "disconnected, 2 components: {D1, D2} | {D3}",
    ),
    ("link-typo", render(tail="[link]\nrate_bps = 1e6\n"), "link.rate_bps", "did you mean 'rate'"),
    (
        "link-overlay-key",
        render(tail='[link]\nwithin_sites = "full"\n'),
        "link.within_sites",
        "overlay edges are configured in [links]",
    ),
    ("link-mtu", render(tail="[link]\nmtu = 10\n"), "link.mtu", "must be between"),
    ("link-rate", render(tail="[link]\nrate = -5\n"), "link.rate", "must be positive"),
    ("link-rate-unit", render(tail='[link]\nrate = "5 Mbps"\n'), "link.rate", "ambiguous"),
    (
        "link-int",
        render(tail="[link]\nfailure_rounds = 1.5\n"),
        "link.failure_rounds",
        "must be an integer",
    ),
    (
        "link-bool",
        render(tail="[link]\nidle_duplicate_retransmits = 1\n"),
        "link.idle_duplicate_retransmits",
        "must be true or false",
    ),
    (
        "link-size",
        render(tail='[link]\nburst_bytes = "1.5B"\n'),
        "link.burst_bytes",
        "not a whole number of bytes",
    ),
    (
        "link-duration",
        render(tail='[link]\nheartbeat_interval = "0ms"\n'),
        "link.heartbeat_interval",
        "must be positive",
    ),
    (
        "link-cross",
        render(tail='[link]\nmax_send_queue_bytes = "1MiB"\n'),
        "link.max_send_queue_bytes",
        "must hold at least one message",
    ),
    (
        "link-not-table",
        render(head='link = "fast"\n'),
        "link",
        "must be a table, got string 'fast'",
    ),
    (
        "membership-typo",
        render(tail="[membership]\nhello = 1\n"),
        "membership.hello",
        "did you mean 'hello_interval'",
    ),
    (
        "membership-zero",
        render(tail="[membership]\nview_settle_interval = 0\n"),
        "membership.view_settle_interval",
        "must be a positive number of seconds",
    ),
    (
        "membership-timeout",
        render(tail='[membership]\nhello_interval = "2s"\n'),
        "membership.failure_timeout",
        "at least 2 × hello_interval",
    ),
    (
        "security-typo",
        render(tail='[security]\nkeyfile = "x"\n'),
        "security.keyfile",
        "did you mean 'key_file'",
    ),
    (
        "security-key-and-insecure",
        render(tail='[security]\nkey_file = "/k"\ninsecure = true\n'),
        "security.insecure",
        "insecure = true and a key_file contradict each other",
    ),
    (
        "security-next-without-key",
        render(tail='[security]\nnext_key_file = "/k"\n'),
        "security.next_key_file",
        "needs security.key_file",
    ),
    (
        "security-key-type",
        render(tail="[security]\nkey_file = 1\n"),
        "security.key_file",
        "must be a string",
    ),
    (
        "security-insecure-type",
        render(tail='[security]\ninsecure = "yes"\n'),
        "security.insecure",
        "must be true or false",
    ),
    (
        "security-removed-key",
        render(tail="[security]\nrequire_auth = true\n"),
        "security.require_auth",
        "unknown key",
    ),
    (
        "limits-typo",
        render(tail="[limits]\nmax_client = 1\n"),
        "limits.max_client",
        "did you mean 'max_clients'",
    ),
    (
        "limits-zero",
        render(tail="[limits]\nmax_clients = 0\n"),
        "limits.max_clients",
        "must be at least 1, got 0",
    ),
    (
        "limits-block-timeout",
        render(tail='[limits]\nblock_timeout = "0s"\n'),
        "limits.block_timeout",
        "must be a positive number of seconds, got 0.0",
    ),
    (
        "limits-type",
        render(tail='[limits]\nmax_group_name = "64"\n'),
        "limits.max_group_name",
        "must be an integer",
    ),
    (
        "limits-size",
        render(
            tail='[limits]\nmax_message_size = "16 MB"\nwindow_messages = 5\n[link]\nmax_message_size = "1MiB"\n'
        ),
        "limits.max_message_size",
        "must not exceed link.max_message_size (1048576 B)",
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "fragment"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_validation_error(text: str, key: str, fragment: str) -> None:
    exc = error_of(text)
    assert (exc.source, exc.key) == (SOURCE, key)
    assert str(exc).startswith(f"{SOURCE}:{key}: " if key else f"{SOURCE}: ")
    assert fragment in str(exc)


def test_disconnected_components_are_all_named() -> None:
    tail = '[links]\nwithin_sites = "none"\nbetween_sites = "none"\n' + EDGE
    assert "3 components: {D1, D2} | {D3}" not in str(error_of(render(tail=tail)))
    assert "2 components: {D1, D2} | {D3}" in str(error_of(render(tail=tail)))
    assert "3 components: {D1} | {D2} | {D3}" in str(
        error_of(render(tail='[links]\nwithin_sites = "none"\nbetween_sites = "none"\n'))
    )


def test_load_config_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read the file: No such file") as info:
        load_config(missing)
    assert info.value.source == str(missing)
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"name = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8 text") as info:
        load_config(binary)
    assert str(info.value).startswith(f"{binary}: ")
    broken = tmp_path / "broken.toml"
    broken.write_text(render() + "\n[cluster\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"invalid TOML: .*\(at line \d+, column \d+\)") as info:
        load_config(str(broken))
    assert info.value.source == str(broken)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(render({2: {"port": "99999"}}), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(wrong)
    assert str(info.value) == f"{wrong}:daemons[2].port: must be in 1..65535, got 99999"


# ---------------------------------------------------------------------------------------
# Constructing the dataclasses directly
# ---------------------------------------------------------------------------------------


def small_cluster(**changes: object) -> ClusterConfig:
    daemons = (
        DaemonSpec("A", 1, "10.0.0.1", 4803, "s", 1e6, 1e6),
        DaemonSpec("B", 2, "10.0.0.2", 4803, "s", 1e6, 1e6),
    )
    kwargs: dict[str, object] = {
        "name": "c",
        "daemons": daemons,
        "sites": (SiteSpec("s"),),
        "links": (LinkSpec("A", "B", 1.0, 1e6),),
        "source": "code",
    }
    kwargs.update(changes)
    return ClusterConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "key", "fragment"),
    [
        ({"links": (LinkSpec("A", "C", 1.0, 1e6),)}, "links[0].b", "unknown daemon 'C'"),
        (
            {"links": (LinkSpec("A", "B", 1.0, 1e6), LinkSpec("B", "A", 2.0, 1e6))},
            "links[1]",
            "duplicate edge B–A (also links[0])",
        ),
        ({"links": ()}, "links", "disconnected"),
        ({"routing": "flood"}, "cluster.routing", "must be one of"),
        ({"name": ""}, "cluster.name", "letters, digits"),
        ({"daemons": ()}, "daemons", "at least one daemon is required"),
        ({"sites": ()}, "daemons[0].site", "unknown site 's'"),
    ],
)
def test_cluster_invariants_hold_for_code_built_configs(
    changes: dict[str, object], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)) as info:
        small_cluster(**changes)
    assert (info.value.source, info.value.key) == ("code", key)


def test_code_built_cluster_defaults_and_equality_ignore_source() -> None:
    config = small_cluster()
    assert config.routing == "shortest-path"
    assert config.link == LinkConfig()
    assert config == dataclasses.replace(config, source="elsewhere")
    assert hash(config) == hash(dataclasses.replace(config, source="elsewhere"))


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: DaemonSpec("A", 1, "10.0.0.1", 1, "s", 0.0, 1.0), "upload"),
        (lambda: DaemonSpec("A", 1, "10.0.0.1", 1, "s", 1.0, math.inf), "download"),
        (lambda: DaemonSpec("A", 1, "host.example", 1, "s", 1.0, 1.0), "host"),
        (lambda: DaemonSpec("A", 1, "10.0.0.1", 1, "bad site", 1.0, 1.0), "site"),
        (lambda: LinkSpec("A", "A", 1.0, 1.0), "b"),
        (lambda: LinkSpec("A", "B", 0.0, 1.0), "weight"),
        (lambda: LinkSpec("A", "B", 1.0, -1.0), "bandwidth"),
        (lambda: Emulation(jitter=math.nan), "jitter"),
        (lambda: Emulation(loss=-0.1), "loss"),
        (lambda: Emulation(rate_bps=0.0), "rate"),
        (lambda: SiteSpec("s", gateway="a b"), "gateway"),
        (lambda: MembershipConfig(hello_interval=-1.0), "membership.hello_interval"),
        (lambda: LimitsConfig(window_messages=0), "limits.window_messages"),
    ],
)
def test_spec_dataclasses_check_their_values(build: object, key: str) -> None:
    assert callable(build)
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.key == key


def test_emulation_noop() -> None:
    assert Emulation().is_noop
    assert not Emulation(loss=0.001).is_noop


# ---------------------------------------------------------------------------------------
# Round trips through dump_config
# ---------------------------------------------------------------------------------------


def test_dump_round_trips_every_section(tmp_path: Path) -> None:
    key = tmp_path / "k"
    config = dataclasses.replace(
        small_cluster(),
        routing="fanout",
        sites=(SiteSpec("s", gateway="B"),),
        links=(LinkSpec("A", "B", 0.1, 1.5e6, Emulation(0.01, 0.002, 0.05, 1e6)),),
        link=LinkConfig(
            mtu=1200, rate_bps=12.5e6, failure_rounds=3, idle_duplicate_retransmits=False
        ),
        membership=MembershipConfig(0.3, 7.0, 0.05, 0.9),
        security=SecurityConfig(key_file=str(key), next_key_file=str(tmp_path / "next")),
        limits=LimitsConfig(1000, 2, 3, 4, 5, 6),
    )
    text = dump_config(config)
    assert parse_config(text) == config
    path = tmp_path / "again.toml"
    path.write_text(text, encoding="utf-8")
    assert load_config(path) == config


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,10}", fullmatch=True)
positive = st.floats(min_value=1e-3, max_value=1e12, allow_nan=False, allow_infinity=False)


@st.composite
def clusters(draw: st.DrawFn) -> ClusterConfig:
    daemon_names = draw(st.lists(names, min_size=1, max_size=8, unique=True))
    site_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    ids = draw(
        st.lists(
            st.integers(1, 2**32 - 1),
            min_size=len(daemon_names),
            max_size=len(daemon_names),
            unique=True,
        )
    )
    daemons = tuple(
        DaemonSpec(
            name,
            node_id,
            draw(st.sampled_from(["127.0.0.1", "::1", "10.1.2.3", "localhost"])),
            1000 + i,
            draw(st.sampled_from(site_names)),
            draw(positive),
            draw(positive),
        )
        for i, (name, node_id) in enumerate(zip(daemon_names, ids, strict=True))
    )
    emulations = st.none() | st.builds(
        Emulation,
        delay=st.floats(0, 1),
        jitter=st.floats(0, 1),
        loss=st.floats(0, 0.99),
        rate_bps=st.none() | positive,
    ).filter(lambda e: not e.is_noop)
    pairs = {frozenset((a, b)) for a, b in itertools.pairwise(daemon_names)}
    extra = draw(st.lists(st.tuples(st.sampled_from(daemon_names), st.sampled_from(daemon_names))))
    pairs |= {frozenset(p) for p in extra if p[0] != p[1]}
    order = {d.name: d.node_id for d in daemons}
    links = []
    for p in pairs:
        a, b = sorted(p, key=order.__getitem__)
        links.append(LinkSpec(a, b, draw(positive), draw(positive), draw(emulations)))
    links.sort(key=lambda s: (order[s.a], order[s.b]))
    return ClusterConfig(
        name=draw(names),
        daemons=daemons,
        sites=tuple(SiteSpec(s) for s in site_names),
        links=tuple(links),
        routing=draw(st.sampled_from(ROUTING_POLICIES)),
        source="generated",
    )


@given(clusters())
def test_dump_round_trips_any_cluster(config: ClusterConfig) -> None:
    assert parse_config(dump_config(config)) == config


# ---------------------------------------------------------------------------------------
# The reference documentation keeps up with the code
# ---------------------------------------------------------------------------------------


def test_docs_name_every_key() -> None:
    docs = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    sections = {
        "link": [f.name.removesuffix("_bps") for f in dataclasses.fields(LinkConfig)],
        "membership": [f.name for f in dataclasses.fields(MembershipConfig)],
        "limits": [f.name for f in dataclasses.fields(LimitsConfig)],
    }
    for section, keys in sections.items():
        part = docs.split(f"## [{section}]", 1)[1].split("\n## ", 1)[0]
        for key in keys:
            assert f"`{key}`" in part, f"docs/config.md [{section}] does not describe {key}"
    for key in (
        "within_sites",
        "between_sites",
        "site_weight",
        "wan_weight",
        "site_emulate",
        "wan_emulate",
        "delay_ms",
        "jitter_ms",
        "gateway",
        "key_file",
        "next_key_file",
        "insecure",
    ):
        assert f"`{key}`" in docs


# ---------------------------------------------------------------------------------------
# Every mistake at once
# ---------------------------------------------------------------------------------------


def test_every_mistake_in_a_file_is_reported_each_naming_its_field() -> None:
    text = render(
        {0: {"port": "70000", "host": '"db.example"'}, 2: {"upload": '"10Mbps"'}},
        tail=(
            "[membership]\nhelo_interval = 1.0\nfailure_timeout = -1\n\n"
            '[limits]\nmax_clients = 0\n\n[link]\nmtu = "big"\n\n'
            '[links]\nsite_weight = -2\n\n[[links.edge]]\na = "D1"\nb = "D9"\n'
        ),
    )
    exc = error_of(text)
    keys = [p.key for p in exc.problems]
    assert keys == [
        "daemons[0].host",
        "daemons[0].port",
        "daemons[2].upload",
        "link.mtu",
        "membership.helo_interval",
        "membership.failure_timeout",
        "limits.max_clients",
    ]
    assert all(p.source == SOURCE for p in exc.problems)
    assert "did you mean 'hello_interval'?" in exc.problems[4].message
    # the single-error API still works: the first problem is `key`, `source` and line one
    assert (exc.key, exc.source) == ("daemons[0].host", SOURCE)
    lines = str(exc).splitlines()
    assert len(lines) == len(keys)
    assert all(line.startswith(f"{SOURCE}:{key}: ") for line, key in zip(lines, keys, strict=True))


def test_every_mistake_between_entries_and_in_links_is_reported() -> None:
    duplicates = render({1: {"name": '"D1"'}, 2: {"port": "5001", "host": '"127.0.0.1"'}})
    exc = error_of(duplicates)
    assert [p.key for p in exc.problems] == ["daemons[1].name", "daemons[2].port"]
    edges = render(
        tail=(
            '[links]\nwan_weight = 0\n\n[[links.edge]]\na = "D1"\nb = "D9"\n\n'
            '[[links.edge]]\na = "D2"\nb = "D3"\nbandwidth = "fast"\n'
        )
    )
    exc = error_of(edges)
    assert [p.key for p in exc.problems] == [
        "links.wan_weight",
        "links.edge[0].b",
        "links.edge[1].bandwidth",
    ]


def test_a_config_error_with_one_problem_is_as_before() -> None:
    exc = ConfigError("must be positive", key="limits.max_clients", source="f.toml")
    assert str(exc) == "f.toml:limits.max_clients: must be positive"
    assert [(p.key, p.source, p.message) for p in exc.problems] == [
        ("limits.max_clients", "f.toml", "must be positive")
    ]


def test_dataclasses_report_every_bad_field() -> None:
    with pytest.raises(ConfigError) as info:
        DaemonSpec("D1", 0, "nowhere", 0, "east", -1.0, 1.0)
    assert [p.key for p in info.value.problems] == ["id", "host", "port", "upload"]


def test_replicate_stall_after_is_a_positive_duration() -> None:
    assert parse(render()).replicate.stall_after == 10.0
    config = parse(render(tail='[replicate]\nstall_after = "2.5s"\n'))
    assert config.replicate.stall_after == 2.5
    assert parse(dump_config(config)).replicate.stall_after == 2.5
    for bad in ("0", "-1", '"nan"'):
        error = error_of(render(tail=f"[replicate]\nstall_after = {bad}\n"))
        assert "stall_after" in str(error)
