"""The [clients] section: socket group, tokens (file and inline), access rules, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshcast.config import (
    ClientsConfig,
    dump_config,
    load_config,
    parse_config,
    read_token_file,
)
from meshcast.errors import ConfigError
from meshcast.group.access import AccessRule, Operation, Principal

BASE = """\
[cluster]
name = "c"

[[sites]]
name = "s"

[[daemons]]
name = "D1"
id = 1
host = "127.0.0.1"
port = 5001
site = "s"
upload = "100Mbit"
download = "100Mbit"
"""
READER = "r" * 32
WRITER = "w" * 32


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def errors(text: str) -> list[tuple[str, str]]:
    """(key, message) of every problem parsing BASE + `text`."""
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + text, "test.toml")
    return [(p.key, p.message) for p in info.value.problems]


def test_no_clients_section_means_no_tokens_no_rules() -> None:
    config = parse_config(BASE)
    assert config.clients == ClientsConfig()
    assert not config.clients.has_tokens
    assert config.clients.load_policy().allowed(Principal("x"), "g") == set(Operation)


def test_token_file_rules_and_socket_group(tmp_path: Path) -> None:
    secret_file(tmp_path / "tokens", f"# who may connect\n\nreaders {READER}\nwriters {WRITER}\n")
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(
        BASE
        + """
[clients]
socket_group = "meshcast"
token_file = "tokens"

[[clients.rule]]
clients = ["monitor-*"]
tokens = ["readers"]
groups = ["metrics.*", "logs"]
allow = ["read"]

[[clients.rule]]
groups = ["*"]
allow = ["join", "send"]
tokens = ["writers"]
""",
        encoding="utf-8",
    )
    config = load_config(cluster)
    clients = config.clients
    assert clients.socket_group == "meshcast"
    assert clients.token_file == str(tmp_path / "tokens")
    assert clients.rules == (
        AccessRule(
            ("metrics.*", "logs"), frozenset({Operation.JOIN}), ("monitor-*",), ("readers",)
        ),
        AccessRule(("*",), frozenset(Operation), None, ("writers",)),
    )
    policy = clients.load_policy(str(cluster))  # the daemon reads the token file
    assert policy.authenticate(READER) == "readers"
    assert policy.authenticate(WRITER) == "writers"
    assert READER not in repr(config)
    # dump_config writes [clients] back: the token file is named, not copied
    again = tmp_path / "again.toml"
    again.write_text(dump_config(config), encoding="utf-8")
    assert READER not in again.read_text(encoding="utf-8")
    assert load_config(again) == config


def test_inline_tokens_need_a_private_cluster_file(tmp_path: Path) -> None:
    text = BASE + f'\n[clients.tokens]\nreaders = "{READER}"\n'
    cluster = secret_file(tmp_path / "cluster.toml", text, 0o644)
    with pytest.raises(ConfigError) as info:
        load_config(cluster)
    assert info.value.key == "clients.tokens"
    assert "holds token secrets" in str(info.value)
    assert "mode 0644" in str(info.value)
    assert READER not in str(info.value)
    cluster.chmod(0o600)
    config = load_config(cluster)
    assert config.clients.load_policy().authenticate(READER) == "readers"
    dumped = tmp_path / "dumped.toml"
    secret_file(dumped, dump_config(config))
    assert load_config(dumped) == config


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620])
def test_a_token_file_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    tokens = secret_file(tmp_path / "tokens", f"readers {READER}\n", mode)
    with pytest.raises(ConfigError, match=f"mode {mode:04o}.*chmod 600") as info:
        read_token_file(tokens)
    assert info.value.key == "clients.token_file"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("readers\n", "line 1: expected NAME SECRET, got 1 words"),
        (f"readers {READER} extra\n", "line 1: expected NAME SECRET, got 3 words"),
        ("readers short\n", "16 to 128 characters, this one has 5"),
        (f"-bad {READER}\n", "line 1: bad token name '-bad'"),
        ("# nothing but comments\n", "holds no token"),
    ],
)
def test_token_file_lines_are_checked(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        read_token_file(secret_file(tmp_path / "tokens", text))
    assert READER not in str(info.value)  # secrets are never echoed


def test_missing_token_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read token file"):
        read_token_file(tmp_path / "nope")
    with pytest.raises(ConfigError, match="is not a regular file"):
        read_token_file(tmp_path)


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (
            '[[clients.rule]]\ngroups = ["a"]\nallow = ["write"]\n',
            "clients.rule[0].allow[0]",
            "unknown operation 'write'; allowed: join, read, send",
        ),
        (
            '[[clients.rule]]\ngroups = "a"\nallow = []\n',
            "clients.rule[0].groups",
            "must be an array of strings, got string 'a'",
        ),
        (
            "[[clients.rule]]\ngroups = [1]\nallow = []\n",
            "clients.rule[0].groups[0]",
            "must be an array of non-empty strings, got integer 1",
        ),
        (
            '[[clients.rule]]\ngroups = ["a"]\nclients = [""]\nallow = []\n',
            "clients.rule[0].clients[0]",
            "got an empty string",
        ),
        (
            "[[clients.rule]]\ngroups = []\nallow = []\n",
            "clients.rule[0].groups",
            "must not be empty ('*' matches every group)",
        ),
        (
            '[[clients.rule]]\ngroups = ["a"]\nclients = []\nallow = []\n',
            "clients.rule[0].clients",
            "must not be empty (leave the key out)",
        ),
        ('[[clients.rule]]\nallow = ["read"]\n', "clients.rule[0].groups", "missing required key"),
        ('[[clients.rule]]\ngroups = ["a"]\n', "clients.rule[0].allow", "missing required key"),
        (
            '[[clients.rule]]\ngroups = ["a"]\nallow = "read"\n',
            "clients.rule[0].allow",
            "must be an array of 'join', 'read', 'send'",
        ),
        (
            '[[clients.rule]]\ngroups = ["a"]\nallow = []\ntokens = ["ops"]\n',
            "clients.rule[0].tokens",
            "unknown token 'ops'; no token is configured",
        ),
        (
            '[[clients.rule]]\ngroups = ["a"]\nallow = []\ngroup = ["b"]\n',
            "clients.rule[0].group",
            "unknown key; did you mean 'groups'?",
        ),
        ("[clients]\nsocket_group = 7\n", "clients.socket_group", "must be a string"),
        ('[clients]\nsocket_grp = "x"\n', "clients.socket_grp", "did you mean 'socket_group'?"),
        ("[clients]\ntokens = 1\n", "clients.tokens", 'must be a table of NAME = "SECRET"'),
        ('[clients.tokens]\nreaders = "short"\n', "clients.tokens.readers", "16 to 128"),
        (
            f'[clients.tokens]\na = "{READER}"\nb = "{READER}"\n',
            "clients.tokens.b",
            "token 'b' has the secret of another token",
        ),
        (
            '[clients.tokens]\nreaders = "with a space in the secret!"\n',
            "clients.tokens.readers",
            "printable ASCII without spaces",
        ),
    ],
)
def test_clients_errors_name_the_key(text: str, key: str, message: str) -> None:
    found = errors(text)
    assert any(k == key and message in m for k, m in found), found


def test_every_bad_rule_is_reported_at_once() -> None:
    found = errors(
        "[clients]\nsocket_group = 7\n"
        '[[clients.rule]]\ngroups = ["a"]\nallow = ["x"]\n'
        '[[clients.rule]]\ngroups = [2]\nallow = ["read"]\n'
    )
    assert [k for k, _ in found] == [
        "clients.socket_group",
        "clients.rule[0].allow[0]",
        "clients.rule[1].groups[0]",
    ]


def test_a_token_in_both_places_is_refused(tmp_path: Path) -> None:
    secret_file(tmp_path / "tokens", f"readers {WRITER}\n")
    cluster = secret_file(
        tmp_path / "cluster.toml",
        BASE + f'\n[clients]\ntoken_file = "tokens"\n[clients.tokens]\nreaders = "{READER}"\n',
    )
    clients = load_config(cluster).clients
    with pytest.raises(ConfigError) as info:
        clients.load_policy(str(cluster))
    assert (info.value.key, info.value.source) == ("clients.token_file", str(cluster))
    assert "token 'readers' is also defined in clients.tokens" in str(info.value)


def test_docs_name_every_clients_key() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text("utf-8")
    part = docs.split("## [clients]", 1)[1].split("\n## ", 1)[0]
    for key in ("socket_group", "token_file", "tokens", "rule", "groups", "allow", "clients"):
        assert f"`{key}`" in part, f"docs/config.md [clients] does not describe {key}"
    for word in ("join", "read", "send"):
        assert f"`{word}`" in part


def test_the_token_file_is_read_by_the_daemon_not_by_every_reader(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"  # not there (yet): a client's machine
    rule = AccessRule(("*",), frozenset({Operation.JOIN}), tokens=("readers",))
    clients = ClientsConfig(token_file=str(tokens), rules=(rule,))
    assert clients.has_tokens
    with pytest.raises(ConfigError, match="cannot read token file") as info:
        clients.load_policy("c.toml")
    assert (info.value.key, info.value.source) == ("clients.token_file", "c.toml")
    secret_file(tokens, f"writers {WRITER}\n")
    with pytest.raises(ConfigError, match="unknown token 'readers'; tokens are writers") as info:
        clients.load_policy("c.toml")
    assert info.value.key == "clients.rule[0].tokens"
    secret_file(tokens, f"readers {READER}\n")
    assert clients.load_policy().allowed(Principal("x", "readers", remote=True), "g") == {
        Operation.JOIN
    }
    tokens.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        clients.load_policy()


def test_a_bad_token_file_is_reported_at_its_key_in_the_cluster_file(tmp_path: Path) -> None:
    secret_file(tmp_path / "tokens", f"readers {READER}\n", 0o644)
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(BASE + '\n[clients]\ntoken_file = "tokens"\n', encoding="utf-8")
    config = load_config(cluster)  # tools read the file without the daemon's secrets
    with pytest.raises(ConfigError) as info:
        config.clients.load_policy(config.source)
    assert [(p.key, p.source) for p in info.value.problems] == [
        ("clients.token_file", str(cluster))
    ]
    assert "mode 0644" in str(info.value)
