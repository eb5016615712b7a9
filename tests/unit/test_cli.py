"""The `meshcast` command line in-process: help texts, option checks, output helpers."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from meshcast.cli import build_parser, main
from meshcast.client.cli import LongLine, check_address, flood_summary, split_lines
from meshcast.demo.cluster import demo_printer
from meshcast.errors import UsageError
from meshcast.sim.scenarios import SCENARIOS, run_scenario


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand parser under `parser`, by its full command line ("bench link")."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                full = f"{parser.prog.removeprefix('meshcast').strip()} {name}".strip()
                found[full] = child
                found.update(subparsers(child))
    return found


def test_every_subcommand_has_a_description_and_shows_its_defaults() -> None:
    commands = subparsers(build_parser())
    assert {
        "demo",
        "daemon",
        "user",
        "flood",
        "status",
        "keygen",
        "sim",
        "bench",
        "bench link",
    } <= set(commands)
    for name, parser in commands.items():
        assert parser.description, f"meshcast {name} has no description"
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            default = action.default
            if (
                not action.option_strings
                or default in (None, False, [], argparse.SUPPRESS)
                or isinstance(default, bool)
            ):
                continue
            assert action.help, f"meshcast {name} {action.option_strings[0]}: no help"
            assert "default" in " ".join(parser._get_formatter()._expand_help(action).split()), (
                f"meshcast {name} {action.option_strings[0]} does not show its default"
            )
        assert "(default: None)" not in text


def test_sim_help_names_only_options_that_exist_and_list_works(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["sim", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert set(SCENARIOS) <= set(listed)
    assert main(["sim"]) == 2
    assert "--scenario" in capsys.readouterr().err


def test_sim_report_explains_in_order() -> None:
    hop = run_scenario("hop-link", seed=1, messages=20)
    assert hop["in_order_required"] is False
    assert "ordering is the group layer's job" in str(hop["order_note"])
    tcp = run_scenario("tcp-link", seed=1, messages=20)
    assert tcp["in_order_required"] is True
    assert tcp["ok"] is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--link", "--loss", "1.5"], "argument --loss: must be at least 0 and below 1"),
        (["demo", "--link", "--loss", "-0.1"], "argument --loss"),
        (["demo", "--link", "--messages", "-5"], "argument --messages: must be at least 1"),
        (["demo", "--link", "--delay", "nan"], "argument --delay"),
    ],
)
def test_demo_options_are_checked_up_front(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "{" not in err
    assert "Traceback" not in err


def test_a_bad_cluster_file_is_a_usage_error_listing_every_mistake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        "[limits]\nmax_clients = 0\nmax_group_name = 1000\n[membership]\nhelo = 1\n",
        encoding="utf-8",
    )
    assert main(["demo", "--config", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    keys = [line.removeprefix(f"meshcast: error: {path}:").split(":")[0] for line in lines]
    assert keys == ["daemons", "membership.helo", "limits.max_clients", "limits.max_group_name"]


def test_addresses_a_daemon_name_and_a_host_port_hint() -> None:
    assert check_address("unix:/tmp/x.sock") == "unix:/tmp/x.sock"
    assert check_address("tcp:127.0.0.1:4900") == "tcp:127.0.0.1:4900"
    assert check_address("D1") == "D1"
    assert check_address("/tmp/x.sock") == "/tmp/x.sock"
    for text in ("localhost:4801", "127.0.0.1:4801", "[::1]:4801"):
        with pytest.raises(UsageError, match=f"for TCP write tcp:{text.replace('[', '.')}"):
            check_address(text)
    with pytest.raises(UsageError, match="not a daemon address"):
        check_address("what ever")


def test_stdin_lines_are_split_with_bounded_memory() -> None:
    buffer = bytearray(b"j chat\ns chat " + b"x" * 100 + b"\nr 1")
    lines, skipped = split_lines(buffer, 50, 0)
    assert lines == ["j chat\n", LongLine(108)]
    assert (bytes(buffer), skipped) == (b"r 1", 0)
    # a line longer than the limit arriving in pieces: never held whole
    buffer = bytearray(b"y" * 80)
    lines, skipped = split_lines(buffer, 50, 0)
    assert (lines, len(buffer), skipped) == ([], 0, 80)
    buffer += b"y" * 30 + b"\nq\n"
    lines, skipped = split_lines(buffer, 50, skipped)
    assert (lines, skipped) == ([LongLine(111), "q\n"], 0)


def test_flood_summary_is_one_line() -> None:
    result = {
        "messages": 10_000,
        "size": 1000,
        "service": "reliable",
        "group": "flood",
        "receivers": 2,
        "received": 10_000,
        "seconds": 0.5,
        "messages_per_second": 20_000.0,
        "mbit_per_second": 160.0,
        "timed_out": False,
    }
    assert flood_summary(result) == (
        "10,000 of 10,000 messages of 1,000 B (reliable, group flood) in 0.500 s: "
        "20,000 msgs/s, 160.00 Mbit/s (slowest of 2 receivers)"
    )
    json.dumps(result)


def test_demo_colours_ok_and_failed_only_on_a_terminal() -> None:
    coloured = io.StringIO()
    say = demo_printer(coloured, colour=True)
    say("  order       ok: every client delivered the same order")
    say("FAILED: D2 did not stop")
    text = coloured.getvalue()
    assert "\x1b[1;32mok\x1b[0m" in text
    assert "\x1b[1;31mFAILED\x1b[0m" in text
    plain = io.StringIO()
    demo_printer(plain, colour=False)("FAILED: D2 did not stop")
    assert plain.getvalue() == "FAILED: D2 did not stop\n"
