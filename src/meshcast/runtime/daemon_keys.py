"""The keys of a running daemon: the ring its links use, reloaded on SIGHUP, and the
warnings of a daemon that runs without one."""

from __future__ import annotations

from collections.abc import Callable

from meshcast.config import SecurityConfig
from meshcast.errors import ConfigError
from meshcast.runtime.keyfile import describe_keyring, load_keyring
from meshcast.runtime.logs import EventLog
from meshcast.wire.keys import KeyRing

INSECURE_WARNING = (
    "INSECURE: this daemon neither encrypts nor authenticates its traffic "
    "([security] insecure = true); anyone who can reach its port can read, forge "
    "and inject messages. Create a key with `meshcast keygen FILE` and set "
    '[security] key_file = "FILE" instead.'
)


class DaemonKeys:
    """The key ring in use (None only with ``[security] insecure = true``) and reloads.

    `reload_security` gives the [security] section a reload reads the key files of (the
    cluster file read again); `install` puts a new ring into use (the daemon's node)."""

    def __init__(
        self,
        security: SecurityConfig,
        source: str,
        *,
        reload_security: Callable[[], SecurityConfig],
        install: Callable[[KeyRing], None],
    ) -> None:
        self._source = source
        self._reload_security = reload_security
        self._install = install
        # read before anything is bound: a daemon without a usable key (and not
        # insecure) does not start (ConfigError naming the file)
        self.ring: KeyRing | None = load_keyring(security, source)
        self.reloads = 0
        self.reload_failures = 0

    @property
    def mode(self) -> str:
        """ "encrypted" with a key ring, "INSECURE" without."""
        return "INSECURE" if self.ring is None else "encrypted"

    def status(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "keys": describe_keyring(self.ring),
            "key_reloads": self.reloads,
            "key_reload_failures": self.reload_failures,
        }

    def reload(self, events: EventLog) -> bool:
        """Read the key files again (what SIGHUP does); True if the new ring is in use.

        On success the new ring replaces the old (``keys_reloaded``); on any failure the
        daemon keeps the ring it has and goes on (``keys_reload_failed`` with the reason).
        A failure that is not a `ConfigError` is re-raised after that, for the bulkhead.
        """
        try:
            security = self._reload_security()
            if security.insecure != (self.ring is None):
                want = "insecure" if security.insecure else "encrypted"
                raise ConfigError(
                    f"the cluster file now asks for {want} mode; switching between "
                    "insecure and encrypted needs a restart"
                )
            ring = load_keyring(security, self._source)
        except Exception as exc:
            # A bad file or edit must never stop a running daemon: it keeps its keys.
            self.reload_failures += 1
            events.error("keys_reload_failed", reason=str(exc), keys=describe_keyring(self.ring))
            if not isinstance(exc, ConfigError):
                raise
            return False
        self.reloads += 1
        self.ring = ring
        if ring is not None:
            self._install(ring)
        events.emit("keys_reloaded", mode=self.mode, keys=describe_keyring(ring))
        return True

    def warn_insecure(self, events: EventLog) -> None:
        events.warning("insecure_warning", message=INSECURE_WARNING)
