"""Value types for the command-line parsers (argparse `type=`): clear messages, exit 2;
the parser class, help formatter and handler runner every `meshcast` subcommand uses
(here, below both `meshcast.cli` and `meshcast.client.cli`, which both run handlers)."""

from __future__ import annotations

import argparse
import enum
import math
import sys
from collections.abc import Callable
from typing import Any

from meshcast.errors import ConfigError, MeshcastError, UsageError


def seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def integer(minimum: int) -> Callable[[str], int]:
    """An integer of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def probability(text: str) -> float:
    """A probability in [0, 1): a loss rate (1 would lose everything)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text!r}")
    return value


def non_negative_seconds(text: str) -> float:
    """A finite number of seconds, zero allowed."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text!r}")
    return value


class HelpFormatter(argparse.HelpFormatter):
    """`--help` shows each option's default (as `ArgumentDefaultsHelpFormatter` does),
    except where the help already says it or there is nothing to show (off, none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or not action.option_strings
            or default is None
            or isinstance(default, bool)
            or default == []
            or default is argparse.SUPPRESS
        ):
            return action.help
        shown = default.name.lower() if isinstance(default, enum.Enum) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class Parser(argparse.ArgumentParser):
    """The parser of `meshcast` and its subcommands: defaults shown in every `--help`
    (subparsers are of the parser's own class, so they inherit this)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def print_error(prog: str, error: BaseException) -> None:
    """``PROG: error: MESSAGE`` on stderr, once per line (a `ConfigError` lists every
    problem of a file on a line of its own)."""
    text = str(error) or type(error).__name__
    for line in text.splitlines():
        print(f"{prog}: error: {line}", file=sys.stderr)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


def run_handler(args: argparse.Namespace, prog: str = "meshcast") -> int:
    """Run the subcommand's handler: typed errors become exit statuses (2 for usage and
    configuration errors, 1 for other failures), Ctrl-C becomes 130."""
    try:
        code: int = args.handler(args)
    except (UsageError, ConfigError) as exc:
        print_error(prog, exc)
        return 2
    except MeshcastError as exc:
        print_error(prog, exc)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


_RATE_PREFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def bit_rate(text: str) -> float:
    """A positive rate in bits/s: a number with an optional decimal prefix, ``80M``,
    ``1.5G``, ``500k``, ``100Mbit`` (as the config's rates). ``MB/s``, ``Mbps`` and the
    like are refused: bytes and bits differ eightfold."""
    value = text.strip()
    lowered = value.lower()
    if lowered.endswith(("bps", "/s", "b")) and not lowered.endswith("bit"):
        raise argparse.ArgumentTypeError(
            f"ambiguous rate {text!r}: write bits/s as e.g. 80M or 80Mbit (1 byte = 8 bits)"
        )
    if lowered.endswith("bit"):
        lowered = lowered[: -len("bit")]
    prefix = lowered[-1:] if lowered[-1:] in ("k", "m", "g", "t") else ""
    try:
        number = float(lowered[: len(lowered) - len(prefix)])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a rate: {text!r} (bits/s, e.g. 80M, 1.5G, 500k, 100Mbit)"
        ) from None
    rate = number * _RATE_PREFIXES[prefix]
    if not (math.isfinite(rate) and rate > 0):
        raise argparse.ArgumentTypeError(f"must be a positive rate, got {text!r}")
    return rate
