"""Connecting to Redis by URL: ``redis://``, ``rediss://`` (TLS), ``unix://``, with a password or ACL user.

Stage: runtime: redis. Imports redis (redis-py) and stdlib. The URL comes from
the caller (``--redis-url``), else ``$FLOWDSL_REDIS_URL``, else
``redis://localhost:6379/0``; the key prefix from ``--prefix``, else
``$FLOWDSL_REDIS_PREFIX``, else ``flowdsl``. An empty value (the option, or
the variable set to nothing) is an error, not the default. Examples::

    redis://localhost:6379/0
    redis://alice:s3cret@redis.internal:6379/2        # ACL user and password
    redis://:s3cret@redis.internal                    # password only (requirepass)
    rediss://redis.example.com:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ssl/ca.pem
    unix:///run/redis/redis.sock?db=0
    unix://alice:s3cret@/run/redis/redis.sock?db=1

Connections are made lazily by redis-py; every process loop of the runtime
survives a lost connection by retrying with exponential backoff
(:class:`Backoff`), so a Redis restart is an outage, not a crash. A server that
refuses ``CLIENT SETNAME`` gets unnamed connections. :func:`server_facts` reads
the server settings the runtime's guarantees rest on (eviction, persistence,
role: docs/runtime.md, "The Redis server's settings").
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import stat
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

__all__ = ["ACL_DOC", "DEFAULT_URL", "SETTINGS_DOC", "TRANSIENT", "Backoff", "RedisConfigError", "ServerFacts",
           "acl_user", "connect", "connect_sync", "describe_url", "maxclients_reached", "naming_refused",
           "no_permission", "refusal", "replica_error", "resolve_prefix", "resolve_url", "role_changed",
           "server_facts", "server_unwell", "unreachable_reason"]

log = logging.getLogger("flowdsl.redis")

DEFAULT_URL = "redis://localhost:6379/0"
_SCHEMES = ("redis", "rediss", "unix")
#: errors that mean "Redis is unreachable or restarting right now": retry later, never crash
TRANSIENT: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                                              ConnectionError, TimeoutError, OSError)


#: answers of a server that is reachable but will not do the work right now (out of memory, a read-only replica
#: after a failover, a script running too long, a failed background save, a cluster reconfiguring): the command's
#: fault is the server's state, not the command's
_UNWELL_CLASSES: tuple[type[BaseException], ...] = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
                                                    redis.exceptions.MasterDownError, redis.exceptions.TryAgainError,
                                                    redis.exceptions.ClusterDownError)
_UNWELL_CODES = ("OOM", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "BUSY", "MISCONF", "NOREPLICAS")


#: such a refusal met by a command inside a script, as Redis 6 reports it: ``ERR Error running script (call to
#: f_…): @user_script:30: @user_script: 30: -OOM command not allowed …`` (Redis 7 answers with the code itself)
_IN_SCRIPT = re.compile(r"^ERR Error running script\b.*?-(" + "|".join(_UNWELL_CODES) + r")\b", re.DOTALL)


def server_unwell(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis saying it cannot do any such work for now (see ``_UNWELL_CODES``): a reason to
    try again later, never one to give up on what was being done."""
    if isinstance(exc, _UNWELL_CLASSES):
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    text = str(exc)
    return text.split(" ", 1)[0] in _UNWELL_CODES or _IN_SCRIPT.match(text) is not None or role_changed(exc)


def groups_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says a stream's consumer group is gone — Redis lost its data (a restart without
    persistence, a flush, an eviction): ``NOGROUP``, or ``UNBLOCKED`` for a blocked read whose stream was deleted.
    The groups are to be made again, not the process stopped. (``UNBLOCKED`` for a server that became a replica
    is :func:`role_changed`: nothing was lost.)"""
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(("NOGROUP", "UNBLOCKED")) \
        and not role_changed(exc)


def role_changed(exc: BaseException) -> bool:
    """Whether ``exc`` is a blocked read ended because the server changed role (a failover made it a replica:
    ``UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)``): the data
    is where it was, on the new primary; a refusal for now (:func:`server_unwell`), not a loss."""
    return isinstance(exc, redis.ResponseError) and str(exc).startswith("UNBLOCKED") and "state changed" in str(exc)


#: an ACL refusal: ``NOPERM …`` (redis-py's NoPermissionError), or a command inside a script refused, which Redis
#: 7.0 answers ``ERR The user executing the script can't …`` (Redis 6 wraps it in ``ERR Error running script …``)
_NO_PERMISSION = re.compile(r"^(ERR )?NOPERM\b|-NOPERM\b|The user executing the script can't")
#: where the permissions a flowdsl ACL user needs are listed
ACL_DOC = 'docs/runtime.md, "ACL users"'


def no_permission(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a command, key or channel to the connection's ACL user: a configuration
    error (retrying cannot help, and it is not the fault of the message being handled)."""
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return True
    return isinstance(exc, redis.ResponseError) and _NO_PERMISSION.search(str(exc)) is not None


def acl_user(url: str) -> str:
    """The ACL user a URL logs in as (``default`` when it names none)."""
    try:
        return str(redis.connection.parse_url(url).get("username") or "default")
    except ValueError:
        return "default"


class RedisConfigError(ValueError):
    """The Redis URL or prefix is unusable; the message says why (never a traceback for users)."""


def resolve_url(url: str | None = None) -> str:
    """``url``, else ``$FLOWDSL_REDIS_URL``, else :data:`DEFAULT_URL`; raises :class:`RedisConfigError` if bad."""
    chosen = _given(url, "--redis-url", "FLOWDSL_REDIS_URL", DEFAULT_URL, "a Redis URL")
    try:
        parts = urlsplit(chosen)
        parts.hostname  # noqa: B018 (parsing the host may fail: a bracket left open, say)
    except ValueError as exc:
        raise RedisConfigError(f"the Redis URL {describe_url(chosen)!r} cannot be read: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise RedisConfigError(f"unsupported Redis URL {describe_url(chosen)!r}: it must start with "
                               "redis://, rediss:// (TLS) or unix://")
    if parts.scheme == "unix" and not parts.path:
        raise RedisConfigError(f"the unix:// URL {describe_url(chosen)!r} names no socket path")
    if parts.scheme != "unix" and _split_userinfo(chosen) and (
            not _host_and_port(parts) or "@" in parts.path + parts.fragment):
        raise RedisConfigError(f"the Redis URL {describe_url(chosen)!r} cannot be read: a '/', '?' or '#' before "
                               "its last '@' ends its host part early; percent-encode them in the user and "
                               "password (%2F, %3F, %23; '@' as %40)")
    if parts.scheme != "unix" and not parts.hostname:
        raise RedisConfigError(f"the Redis URL {describe_url(chosen)!r} names no host")
    _check_database(chosen, parts)
    return chosen


def _check_database(url: str, parts: SplitResult) -> None:
    """Refuse a URL that does not name its database once, as a number: redis-py reads a path that is not one
    (``/x``, ``/1x``, ``/O``) as database 0, and of a database given twice (``/2?db=3``, ``?db=1&db=2``) takes
    one without a word."""
    where = describe_url(url)
    values = [value for name, value in parse_qsl(parts.query, keep_blank_values=True) if name == "db"]
    for value in values:
        if not re.fullmatch(r"[0-9]+", value):
            raise RedisConfigError(f"the Redis URL {where!r} selects no database: db must be a database number "
                                   f"(?db=0), not {value!r}")
    given = [f"?db={value}" for value in values]
    if parts.scheme != "unix":
        path = unquote(parts.path)
        if path not in ("", "/"):
            if not re.fullmatch(r"/[0-9]+", path):
                raise RedisConfigError(f"the Redis URL {where!r} selects no database: its path must be empty or "
                                       f"/<database number> (as in redis://host:6379/0), not {path!r}")
            given.insert(0, f"the path {path}")
    if len(given) > 1:
        how = "as ?db=N" if parts.scheme == "unix" else "in the path (redis://host:port/N) or as ?db=N"
        raise RedisConfigError(f"the Redis URL {where!r} selects the database more than once "
                               f"({' and '.join(given)}): give it once, {how}")


def refusal(url: str, exc: BaseException) -> str:
    """One sentence for an error reply (or a reply that is not Redis) met while talking to ``url``."""
    where = describe_url(url)
    text = str(exc)
    if "DB index" in text and not text.startswith("the URL selects"):
        try:
            db = redis.connection.parse_url(url).get("db", 0)
        except ValueError:
            db = "?"
        text = (f"the URL selects database {db}, which this Redis server refused ({text}): a server has the "
                "databases 0 to its `databases` setting - 1 (16 by default)")
    elif isinstance(exc, redis.InvalidResponse):
        text = f"the server did not answer in the Redis protocol ({text}); is this the address of a Redis server?"
    elif no_permission(exc):
        text = f"{text} (the ACL user {acl_user(url)!r} lacks a permission flowdsl needs: see {ACL_DOC})"
    elif "invalid bulk length" in text:
        text = f"{text} (a value larger than the server's proto-max-bulk-len: keep large data out of runs)"
    elif "unknown command" in text:  # (renamed or disabled: its answer quotes the arguments — a script's source)
        text = re.sub(r", with args beginning with: .*", "", text, flags=re.DOTALL) + \
            " (renamed or disabled on this server: rename-command)"
    return f"Redis at {where} refused: {text}"


def resolve_prefix(prefix: str | None = None) -> str:
    """``prefix``, else ``$FLOWDSL_REDIS_PREFIX``, else ``flowdsl``; raises :class:`RedisConfigError` if empty."""
    return _given(prefix, "--prefix", "FLOWDSL_REDIS_PREFIX", "flowdsl", "a key prefix")


def _given(value: str | None, option: str, variable: str, default: str, what: str) -> str:
    """``value`` unless None, else the environment variable when it is set, else ``default``. An empty value
    given explicitly — the option, or the variable set to nothing — is an error, never the default in disguise."""
    if value is not None:
        if not value.strip():
            raise RedisConfigError(f"{option} is empty: give {what}, or leave the option out to use "
                                   f"${variable} or the default {default!r}")
        return value
    env = os.environ.get(variable)
    if env is not None:
        if not env.strip():
            raise RedisConfigError(f"${variable} is set but empty: set it to {what}, or unset it to use the "
                                   f"default {default!r}")
        return env
    return default


def not_a_socket(url: str) -> str | None:
    """Why a ``unix://`` URL cannot reach a server when its path is there but is not a socket (a regular file, a
    directory, a FIFO: the socket's own "connection refused" says nothing of it); None otherwise."""
    if not url.startswith("unix://"):
        return None
    path = urlsplit(url).path
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None  # (missing: the connection's own "No such file or directory" says it)
    if stat.S_ISSOCK(mode):
        return None
    kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
        "a regular file" if stat.S_ISREG(mode) else "not a socket"
    return (f"'{path}' is {kind}, not a Unix socket: give the path of the socket the server listens on (its "
            "`unixsocket` setting)")


def describe_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs); where a user or password that
    holds ``/``, ``?`` or ``#`` makes the URL ambiguous, everything up to its last ``@``."""
    described = _described(url)
    return _mask_to_last_at(described) if _split_userinfo(described) else described


def _host_and_port(parts: SplitResult) -> bool:
    """Whether the URL names a host and, if any, a port that is a number."""
    try:
        parts.port  # noqa: B018 (a port that is not a number raises)
    except ValueError:
        return False
    return bool(parts.hostname)


def _described(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:  # a URL that cannot be parsed: hide what looks like a password all the same
        return _mask_to_last_at(url)
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k == "password" for k, _ in pairs):  # (redis-py also takes ?password=)
        query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[-1]}"
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def _split_userinfo(url: str) -> bool:
    """Whether an ``@`` after ``//`` lies beyond where a URL parser ends the host part: a user or password
    holding ``/``, ``?`` or ``#`` not percent-encoded (``openssl rand -base64`` makes such passwords), which
    parsers then read as the path, query or fragment — password included."""
    start = url.find("//")
    if start < 0 or "@" not in url[start + 2:]:
        return False
    head = re.split(r"[/?#]", url[start + 2:], maxsplit=1)[0]
    return "@" not in head


def _mask_to_last_at(url: str) -> str:
    """What lies between the user's ``:`` (or ``//``) and the last ``@`` hidden, whatever a parser would make
    of it."""
    start, at = url.find("//"), url.rfind("@")
    if start < 0 or at < start:
        return url
    user, colon, _ = url[start + 2:at].partition(":")
    kept = f"{user}:" if colon and not re.search(r"[/?#]", user) else ""
    return f"{url[:start + 2]}{kept}***{url[at:]}"


# --- connection names: optional ---------------------------------------------------------------------------
#
# Every connection names itself (CLIENT SETNAME: flowdsl-worker:…, flowdsl-reader:…, flowdsl-client), which only
# labels it in CLIENT LIST. A server that refuses the command — ``rename-command CLIENT ""``, an ACL user without
# ``+client|setname`` — must not stop a process from starting: the connections then go unnamed (said once per
# server and user, at INFO).

#: the servers (address, ACL user) that refused CLIENT SETNAME to this process: its connections there go unnamed
_UNNAMED: set[tuple[str, str]] = set()


def naming_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is a server's refusal of ``CLIENT SETNAME`` (an unknown or renamed command, or an ACL user
    without ``client|setname``): a reason to go on unnamed, never to stop."""
    if not isinstance(exc, redis.ResponseError):
        return False
    text = str(exc).lower()
    return "setname" in text and ("unknown" in text or "no permissions" in text or no_permission(exc))


def _server_of(connection: Any) -> tuple[str, str]:
    where = getattr(connection, "path", None) or f"{getattr(connection, 'host', '?')}:{getattr(connection, 'port', '')}"
    return str(where), str(getattr(connection, "username", None) or "default")


def _unnamed(connection: Any, exc: BaseException) -> None:
    server = _server_of(connection)
    if server not in _UNNAMED:
        _UNNAMED.add(server)
        log.info("Redis at %s refuses to name connections (CLIENT SETNAME: %s); this process's connections go "
                 "unnamed in CLIENT LIST", server[0], exc)
    connection.client_name = None


class _AsyncNamed:
    """An asyncio connection that goes on unnamed when the server refuses ``CLIENT SETNAME``."""

    client_name: str | None

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        if self.client_name and _server_of(self) in _UNNAMED:
            self.client_name = None
        try:
            await super().on_connect_check_health(check_health)  # type: ignore[misc]
        except redis.ResponseError as exc:
            if not (self.client_name and naming_refused(exc)):
                raise
            _unnamed(self, exc)  # (the refusal was read: the connection is in step; its setup is done again)
            await super().on_connect_check_health(check_health)  # type: ignore[misc]


class _SyncNamed:
    """A blocking connection that goes on unnamed when the server refuses ``CLIENT SETNAME``."""

    client_name: str | None

    def on_connect_check_health(self, check_health: bool = True) -> None:
        if self.client_name and _server_of(self) in _UNNAMED:
            self.client_name = None
        try:
            super().on_connect_check_health(check_health)  # type: ignore[misc]
        except redis.ResponseError as exc:
            if not (self.client_name and naming_refused(exc)):
                raise
            _unnamed(self, exc)
            super().on_connect_check_health(check_health)  # type: ignore[misc]


def _named(mixin: type, base: type) -> type:
    """``base`` with ``mixin`` first, under ``base``'s own name (what tests and logs that name it expect)."""
    return type(base.__name__, (mixin, base), {"__module__": __name__, "__doc__": base.__doc__})


_ASYNC = {scheme: _named(_AsyncNamed, base) for scheme, base in (
    ("redis", aioredis.connection.Connection), ("unix", aioredis.connection.UnixDomainSocketConnection),
    ("rediss", aioredis.connection.SSLConnection))}
_SYNC = {scheme: _named(_SyncNamed, base) for scheme, base in (
    ("redis", redis.connection.Connection), ("unix", redis.connection.UnixDomainSocketConnection),
    ("rediss", redis.connection.SSLConnection))}


def _connection_class(url: str, blocking: bool) -> type:
    scheme = url.split(":", 1)[0]
    return (_SYNC if blocking else _ASYNC).get(scheme, (_SYNC if blocking else _ASYNC)["redis"])


def _options(url: str, client_name: str | None, *, blocking: bool = False, socket_timeout: float = 15.0
             ) -> dict[str, Any]:
    # each kind of client its own kind of Retry (redis-py 8.2 warns of, and converts, a blocking one given to an
    # asyncio client)
    retry = (Retry if blocking else AsyncRetry)(ExponentialBackoff(cap=1.0, base=0.02), 2)
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_connect_timeout": 5,
        "socket_timeout": socket_timeout,
        "health_check_interval": 30,
        "client_name": client_name,
        "retry": retry,
        "connection_class": _connection_class(url, blocking),
    }
    if not url.startswith("unix:"):
        options["socket_keepalive"] = True  # TCP only
    return options


def connect(url: str | None = None, *, client_name: str | None = None,
            max_connections: int | None = None, socket_timeout: float = 15.0) -> aioredis.Redis:
    """An asyncio client for ``url`` (see :func:`resolve_url`); raises :class:`RedisConfigError` if bad.
    ``socket_timeout``: how long a reply may take (seconds; a connection that takes longer is closed and the command
    tried again on a new one: a network path that drops packets gives no other sign) — more than any ``BLOCK`` of a
    command it sends."""
    chosen = resolve_url(url)
    options = _options(chosen, client_name, socket_timeout=socket_timeout)
    if max_connections is not None:
        options["max_connections"] = max_connections
    try:
        return aioredis.Redis.from_url(chosen, **options)
    except (ValueError, TypeError) as exc:
        raise RedisConfigError(f"cannot use the Redis URL {describe_url(chosen)!r}: {exc}") from None


def connect_sync(url: str | None = None, *, client_name: str | None = None) -> redis.Redis:
    """A blocking client for ``url`` (the CLI's one-shot commands and the tests)."""
    chosen = resolve_url(url)
    options = _options(chosen, client_name, blocking=True)
    try:
        return redis.Redis.from_url(chosen, **options)
    except (ValueError, TypeError) as exc:
        raise RedisConfigError(f"cannot use the Redis URL {describe_url(chosen)!r}: {exc}") from None


class Backoff:
    """Exponential backoff with full jitter for the loops that retry after a lost connection.

    ``await backoff.wait()`` sleeps 0..min(cap, base·2ⁿ) seconds and counts the
    failure; ``reset()`` after a success. ``failing_since`` is when the current
    run of failures began (for "Redis unreachable for N s" messages).
    """

    def __init__(self, base: float = 0.05, cap: float = 2.0, floor: float = 0.01):
        self.base = base
        self.cap = cap
        self.floor = floor  # added to every wait (a lost connection is not retried in a busy loop)
        self.failures = 0
        self.failing_since: float | None = None

    def delay(self) -> float:
        return random.uniform(0, min(self.cap, self.base * (2 ** min(self.failures, 16))))

    async def wait(self) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        self.failures += 1
        await asyncio.sleep(self.delay() + self.floor)

    def reset(self) -> None:
        self.failures = 0
        self.failing_since = None


# --- the server's settings that the runtime's guarantees rest on ----------------------------------------------

#: where the settings a flowdsl Redis needs are documented
SETTINGS_DOC = 'docs/runtime.md, "The Redis server\'s settings"'


@dataclass(frozen=True)
class ServerFacts:
    """What a Redis server says of the settings flowdsl's guarantees rest on (``INFO``; ``CONFIG GET`` where the
    server allows it — managed services often do not: then ``save`` and ``proto_max_bulk_len`` are None)."""

    run_id: str = ""  # changes at every restart of the server
    role: str = ""  # master | slave ('' when INFO did not say)
    primary: str = ""  # host:port of the primary a replica follows
    maxmemory: int = 0
    policy: str = ""  # maxmemory-policy ('' when unknown)
    aof: bool | None = None  # appendonly
    fsync: str | None = None  # appendfsync (CONFIG GET)
    save: str | None = None  # the RDB save points (CONFIG GET save; '' for none)
    proto_max_bulk_len: int | None = None  # (CONFIG GET)

    @property
    def evicts(self) -> bool:
        """Whether the server deletes keys when it is full (``maxmemory`` set, a policy other than noeviction)."""
        return self.maxmemory > 0 and self.policy not in ("", "noeviction")

    def eviction(self) -> str:
        """The eviction setting in a few words (``maxmemory 20mb, maxmemory-policy allkeys-lru``)."""
        return f"maxmemory {_size(self.maxmemory)}, maxmemory-policy {self.policy}"

    def warnings(self) -> list[str]:
        """One sentence per setting under which flowdsl cannot keep its guarantees (docs/runtime.md, "Sizing and
        operating"); none for a server set up as documented."""
        said = []
        if self.evicts:
            what = ("runs (their state, journal and leases), the queues and the timers" if
                    self.policy.startswith("allkeys") else
                    "finished runs before their retention ends (with a late answer they still wait for) and the "
                    "failure counts of the dead letters")
            said.append(f"this Redis evicts keys when it is full ({self.eviction()}): it may delete {what} — runs "
                        "then vanish mid-way and step results are dropped; set maxmemory-policy noeviction (Redis "
                        "then refuses writes when full, which flowdsl waits out) and size maxmemory for the runs "
                        f"kept ({SETTINGS_DOC})")
        if self.aof is False and self.save == "":
            said.append("this Redis keeps no data on disk (appendonly no, save \"\"): a restart of it loses every "
                        f"run, its queues and timers; set appendonly yes, appendfsync everysec ({SETTINGS_DOC})")
        elif self.aof is False and self.save:
            said.append("this Redis persists by RDB snapshots only (appendonly no): a restart of it takes every "
                        "run back to the last snapshot, so steps completed since run again (with the same "
                        f"idempotency keys) and results since are lost; set appendonly yes ({SETTINGS_DOC})")
        return said

    def loss_causes(self) -> str:
        """The likely causes of data missing from this server, in a few words."""
        if self.evicts:
            return f"evicted by the server ({self.eviction()}), or Redis restarted without persistence, or flushed"
        return "Redis restarted without persistence, or flushed"

    def restart_note(self) -> str:
        """What a restart of this server may have cost, by its persistence settings."""
        if self.aof:
            fsync = self.fsync or "everysec"
            return {"always": "with appendfsync always, nothing acknowledged was lost",
                    "no": "with appendfsync no, the writes the OS had not flushed (up to ~30 s) may be lost: runs "
                          "may have gone back in time, and steps completed since may run again"}.get(
                fsync, "with appendfsync everysec, up to about a second of writes may be lost: steps completed "
                       "in that second may run again (with the same idempotency keys)")
        if self.save:
            return ("it persists by RDB snapshots only: every run went back to the last snapshot, and steps "
                    "completed since run again (with the same idempotency keys)")
        if self.save == "":
            return "it keeps no data on disk: every run it held is gone"
        return "what it kept depends on its persistence settings (appendonly, save)"


def _size(n: int) -> str:
    for unit, size in (("gb", 1 << 30), ("mb", 1 << 20), ("kb", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


async def server_facts(client: aioredis.Redis, *, config_get: bool = False) -> ServerFacts | None:
    """The server's settings (:class:`ServerFacts`), or None when it will not say (``INFO`` refused to the ACL
    user, or not answered): the caller then checks nothing. ``config_get``: also ask ``CONFIG GET`` (as the
    default user only: an ACL user's refusal would fill the server's ACL LOG)."""
    try:
        info = await client.info()
    except redis.ResponseError as exc:
        log.debug("INFO refused (%s): the server's settings are not checked", exc)
        return None
    config: dict[str, str] = {}
    for name in ("save", "appendfsync", "proto-max-bulk-len") if config_get else ():
        try:  # (refused on managed services, and to ACL users without +config|get: INFO says enough)
            got = await client.config_get(name)
        except redis.ResponseError:
            break
        config.update({_text(k): _text(v) for k, v in got.items()})
    return _facts(info, config)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _facts(info: Any, config: dict[str, str]) -> ServerFacts:
    def get(name: str, default: Any = "") -> Any:
        value = info.get(name, default) if isinstance(info, dict) else default
        return _text(value) if isinstance(value, bytes) else value

    def number(value: Any) -> int:
        try:
            return int(value)
        except (TypeError, ValueError):
            return 0

    aof = get("aof_enabled", None)
    bulk = config.get("proto-max-bulk-len")
    primary = f"{get('master_host')}:{get('master_port')}" if get("master_host") else ""
    return ServerFacts(run_id=str(get("run_id")), role=str(get("role")), primary=primary,
                       maxmemory=number(get("maxmemory", 0)), policy=str(get("maxmemory_policy")),
                       aof=None if aof is None else bool(number(aof)), fsync=config.get("appendfsync"),
                       save=config.get("save"), proto_max_bulk_len=number(bulk) if bulk else None)


def replica_error(url: str, facts: ServerFacts) -> RedisConfigError | None:
    """The error of a process pointed at a replica (which refuses every write, for good), or None."""
    if facts.role != "slave":
        return None
    of = f" of {facts.primary}" if facts.primary else ""
    return RedisConfigError(f"Redis at {describe_url(url)} is a read-only replica{of}: flowdsl writes on every "
                            "step; point --redis-url at the primary (after a failover, at the replica promoted)")


def maxclients_reached(url: str, timeout: float = 0.5) -> bool:
    """Whether the server of ``url`` refuses new connections now because it has reached its ``maxclients``: it
    says so (``-ERR max number of clients reached``) as it accepts, then closes — a client that wrote its first
    command meanwhile sees only a broken pipe or a reset. A connection that only listens reads the answer."""
    import socket

    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = parts.path
        elif parts.scheme == "redis":
            address = (parts.hostname or "localhost", parts.port or 6379)
            sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
        else:
            return False  # (TLS: the answer comes inside the TLS session)
        with sock:
            sock.settimeout(timeout)
            sock.connect(address)
            data = sock.recv(256)
    except (OSError, ValueError):
        return False
    return b"max number of clients reached" in data


#: what a lost connection looks like when the server closed it as the connection opened
_CLOSED_AT_ONCE = ("Broken pipe", "Connection reset", "closed by the server", "Connection closed by server",
                   "Connection lost")  # (the last: redis-py without hiredis, its write refused)


def unreachable_reason(url: str, exc: BaseException) -> str:
    """Why ``url`` cannot be reached, for a message: a path that is not a socket, a server at its ``maxclients``
    (whatever the lost connection said), else the error itself."""
    text = str(exc)
    if "max number of clients reached" in text or (
            any(part in text for part in _CLOSED_AT_ONCE) and maxclients_reached(url)):
        return ("the server has reached its maxclients (it answered \"max number of clients reached\" and closed "
                "the connection): raise maxclients, or close idle clients (a worker process holds 5 connections, a "
                "client 1-3)")
    return not_a_socket(url) or text
