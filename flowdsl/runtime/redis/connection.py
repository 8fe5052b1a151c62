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
(:class:`Backoff`), so a Redis restart is an outage, not a crash.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import stat
import time
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

__all__ = ["ACL_DOC", "DEFAULT_URL", "TRANSIENT", "Backoff", "RedisConfigError", "acl_user", "connect", "connect_sync",
           "describe_url", "no_permission", "refusal", "resolve_prefix", "resolve_url", "server_unwell"]

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
    return text.split(" ", 1)[0] in _UNWELL_CODES or _IN_SCRIPT.match(text) is not None


def groups_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says a stream's consumer group is gone — Redis lost its data (a restart without
    persistence, a flush): ``NOGROUP``, or ``UNBLOCKED`` for a blocked read whose stream was deleted. The groups
    are to be made again, not the process stopped."""
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(("NOGROUP", "UNBLOCKED"))


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


def _options(url: str, client_name: str | None, *, blocking: bool = False) -> dict[str, Any]:
    # each kind of client its own kind of Retry (redis-py 8.2 warns of, and converts, a blocking one given to an
    # asyncio client)
    retry = (Retry if blocking else AsyncRetry)(ExponentialBackoff(cap=1.0, base=0.02), 2)
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_connect_timeout": 5,
        "socket_timeout": 15,
        "health_check_interval": 30,
        "client_name": client_name,
        "retry": retry,
    }
    if not url.startswith("unix:"):
        options["socket_keepalive"] = True  # TCP only
    return options


def connect(url: str | None = None, *, client_name: str | None = None,
            max_connections: int | None = None) -> aioredis.Redis:
    """An asyncio client for ``url`` (see :func:`resolve_url`); raises :class:`RedisConfigError` if bad."""
    chosen = resolve_url(url)
    options = _options(chosen, client_name)
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
