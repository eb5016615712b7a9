"""Logging of the runtime: daemon events as JSON or readable lines, a node-id prefix
and rate limiting for remote faults."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

from meshcast.errors import UsageError
from meshcast.wire.client import json_ready

EVENTS_LOGGER = "meshcast.daemon"  # state-change events: one JSON object per line
events_log = logging.getLogger(EVENTS_LOGGER)


class NodeLogAdapter(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every record with the local node id: ``[node 3] ...``."""

    def __init__(self, logger: logging.Logger, node: int) -> None:
        super().__init__(logger, {"node": node})
        self._prefix = f"[node {node}] "

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        return self._prefix + str(msg), kwargs


class RateLimiter:
    """Says whether the n-th occurrence of something deserves a log line.

    The first `burst` occurrences do, then every `every`-th one, so a peer that floods
    garbage costs a few log lines and a counter, not a disk.
    """

    __slots__ = ("_burst", "_every")

    def __init__(self, burst: int = 5, every: int = 1000) -> None:
        self._burst = burst
        self._every = every

    def allows(self, count: int) -> bool:
        return count <= self._burst or count % self._every == 0


class JsonLineFormatter(logging.Formatter):
    """Each record as one JSON object on one line.

    Event records (logged by `EventLog`) become ``{"ts", "level", "event", ...fields}``;
    any other record becomes ``{"ts", "level", "event": "log", "logger", "message"}``, with
    ``"traceback"`` when it carries one.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
        }
        event = getattr(record, "event", None)
        fields = getattr(record, "fields", None)
        if isinstance(event, str) and isinstance(fields, dict):
            entry["event"] = event
            entry.update(fields)
        else:
            entry["event"] = "log"
            entry["logger"] = record.name
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(json_ready(entry), default=str, allow_nan=False)


class HumanLineFormatter(logging.Formatter):
    """Each record as one line for a person at a terminal.

    ``12:00:01.234 D1 view_agreed members=[1, 2, 3] ...`` for events (time, daemon, event,
    the other fields as key=value); ``12:00:01.234 WARNING logger: message`` otherwise.
    """

    _TAGS = ("daemon", "node")

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        stamp += f".{int(record.msecs):03d}"
        level = "" if record.levelno == logging.INFO else f" {record.levelname}"
        event = getattr(record, "event", None)
        fields = getattr(record, "fields", None)
        if isinstance(event, str) and isinstance(fields, dict):
            daemon = fields.get("daemon", "")
            rest = " ".join(
                f"{k}={_human_value(v)}" for k, v in fields.items() if k not in self._TAGS
            )
            line = f"{stamp}{level} {daemon} {event}" + (f" {rest}" if rest else "")
        else:
            line = f"{stamp}{level} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _human_value(value: object) -> str:
    value = json_ready(value)
    return value if isinstance(value, str) and value and " " not in value else json.dumps(value)


LOG_FORMATS = ("auto", "human", "json")


def configure_logging(verbosity: int, stream: Any = None, log_format: str = "json") -> None:
    """One line on stderr for every record; events always, other records by `verbosity`.

    0: warnings, 1: info, 2+: debug. `log_format` "json" writes JSON lines
    (`JsonLineFormatter`), "human" readable lines (`HumanLineFormatter`), "auto" human
    lines when the stream is a terminal and JSON lines otherwise (a pipe, a file: what
    programs read). Replaces the formatter of the root logger's handlers (adding a
    stderr handler when there is none), so the whole process logs one format.
    """
    if log_format not in LOG_FORMATS:
        raise UsageError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr if stream is None else stream))
    if log_format == "auto":
        out = stream if stream is not None else sys.stderr
        is_terminal = getattr(out, "isatty", None)
        log_format = "human" if is_terminal is not None and is_terminal() else "json"
    formatter = HumanLineFormatter() if log_format == "human" else JsonLineFormatter()
    for handler in root.handlers:
        handler.setFormatter(formatter)
    root.setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG))
    events_log.setLevel(logging.INFO)


class EventLog:
    """State-change events of one daemon, each tagged with its name and node id."""

    def __init__(self, name: str, node: int) -> None:
        self._tags = {"daemon": name, "node": node}

    def emit(self, event: str, /, **fields: object) -> None:
        """Log `event` at INFO with `fields` (JSON-ready values)."""
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, /, **fields: object) -> None:
        """Log `event` at WARNING with `fields`."""
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, /, **fields: object) -> None:
        """Log `event` at ERROR with `fields`."""
        self._log(logging.ERROR, event, fields)

    def log(self, level: int, event: str, fields: dict[str, object]) -> None:
        """Log `event` at `level` (a `logging` level) with `fields`."""
        self._log(level, event, fields)

    def _log(self, level: int, event: str, fields: dict[str, object]) -> None:
        events_log.log(level, event, extra={"event": event, "fields": {**self._tags, **fields}})
