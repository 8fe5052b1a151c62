"""Every Redis key, channel and member name the Redis runtime uses, in one place.

Stage: runtime: redis. Imports stdlib and the run-id rule of ``..record``. Nothing else in the package
spells a key: it asks a :class:`Keys` for it. The layout (docs/runtime.md,
"The Redis data model"):

Per run — all under the run's ``{run_id}`` hash tag, so one run lives in one
Redis Cluster slot and every transition script touches a single slot::

    <prefix>:run:{<run_id>}            hash    state (kernel state JSON as of version sv, written by
                                               the journal entry sj: a snapshot), v (version), lt
                                               (last transition token), status, flow, plan, pid (plan
                                               id), started, finished, ret (retention ms), sts
                                               (schedule-to-start ms), submitted, resolved (when a
                                               person resolved the run, ms), sig:<signal id> (the
                                               journal entry that applied that signal: never twice),
                                               w (what its waits wait for, while one does: .run_waits)
    <prefix>:run:{<run_id>}:journal    stream  one entry per transition: v, in (the input event),
                                               ev (the emitted events), or note (a runtime record),
                                               or resolved (a person's resolution)
    <prefix>:run:{<run_id>}:tasks      hash    task id -> lease: q | r:<token> | xq | xr:<token>
    <prefix>:run:{<run_id>}:outbox     hash    version -> the commands of that transition not yet
                                               carried out (JSON); s:<task id> -> the dispatch message
                                               of a task its dispatching process runs itself

Shared — under the ``{<prefix>}`` hash tag (one slot, so one XREADGROUP can
block on every queue and one script can move timers between the two sets)::

    {<prefix>}:control                 stream  start requests (consumer group); cancel requests of
                                               older clients (before the cancels stream; read as ever)
    {<prefix>}:cancels                 stream  cancel requests of started runs (consumer group), read
                                               whether or not a worker has a free slot
    {<prefix>}:signals                 stream  signals sent to runs (consumer group), read with the
                                               cancel requests, whether or not a worker has a free slot
    {<prefix>}:task:<worker>           stream  dispatched attempts for one worker (consumer group):
                                               m (the dispatch command, JSON), v (its outbox version),
                                               g (the run's generation); t on an entry put back from
                                               the dead letters: the trigger it takes over
    {<prefix>}:llm                     stream  dispatched LLM attempts (consumer group)
    {<prefix>}:timers                  zset    member -> due (ms, Redis server clock)
    {<prefix>}:timers:claimed          zset    member -> lease expiry of a timer being fired
    {<prefix>}:runs                    zset    run id -> started (ms): the listing index
    {<prefix>}:workers                 hash    consumer name -> its liveness record (JSON)
    {<prefix>}:dead                    stream  dead letters: entries set aside because they cannot be
                                               handled (undecodable, or their handling failed again and
                                               again): where from, why, and their fields byte for byte
    {<prefix>}:failed:<trigger>        string  how many times handling that entry failed (lives a day)
    <prefix>:cancel                    pub/sub task ids whose cancellation was requested (a channel is
                                               server-wide: every database shares it, so a worker acts
                                               on a notice only once its own run's lease says xr:)

Timer members are ``t|<run_id>|<timer id>`` (a kernel timer) and
``s|<run_id>|<task id>`` (a schedule-to-start deadline); a run id never
contains ``|``.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

# what a run id may be: one rule for both runtimes (no ``{``, ``}``, ``|`` or ``/`` among its characters)
from flowdsl.runtime.record import RUN_ID_RE, check_run_id

__all__ = ["ACL_COMMANDS", "DEFAULT_PREFIX", "GROUP", "RUN_ID_RE", "SIGNAL_FIELD", "SIGNAL_ID_FIELD", "WAITS_FIELD",
           "Keys", "TimerMember", "check_run_id"]

#: the key prefix unless configured (``--prefix``, ``$FLOWDSL_REDIS_PREFIX``)
DEFAULT_PREFIX = "flowdsl"
#: the consumer group every worker process joins, on every stream
GROUP = "flowdsl"
#: the prefix of a run hash's field that names a signal applied to the run (``sig:<signal id>``: its journal entry)
SIGNAL_FIELD = "sig:"
#: the prefix of a run hash's field that names the signal an id was used for (``sigd:<signal id>``: the digest of
#: its name and payload, then its name), recorded by the client before it sends: a signal id is one signal's
SIGNAL_ID_FIELD = "sigd:"
#: the run hash's field that says what the run's waits wait for while one does (:mod:`.run_waits`; absent otherwise)
WAITS_FIELD = "w"
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")
#: every command a worker process, the client and the CLI send (directly, or inside the Lua scripts), as ACL rules
#: (docs/runtime.md, "ACL users"); the connections also send AUTH, and CLIENT SETINFO, whose refusal is ignored.
#: Two are optional: CLIENT SETNAME (a refusal leaves the connections unnamed) and INFO (a refusal leaves the
#: server's eviction, persistence and role settings unchecked); CONFIG GET is sent only as the default user
ACL_COMMANDS = ("+evalsha +script|load +time +ping +select +client|setname +info +subscribe +unsubscribe +publish "
                "+xadd +xread +xreadgroup +xrange +xrevrange +xlen +xack +xdel +xpending +xclaim +xautoclaim "
                "+xgroup|create +xgroup|delconsumer +xinfo|consumers +hget +hmget +hset +hdel +hexists +hgetall "
                "+zadd +zrem +zscore +zcard +zrange +zrevrange +zrangebyscore +exists +del +incr +pexpire +persist")


@dataclass(frozen=True)
class TimerMember:
    """A parsed member of the timer set: ``kind`` is ``t`` (kernel timer) or ``s`` (schedule-to-start)."""

    kind: str
    run_id: str
    ident: str  # the timer id (kind t) or the task id (kind s)

    def encode(self) -> str:
        return f"{self.kind}|{self.run_id}|{self.ident}"

    @classmethod
    def decode(cls, raw: bytes | str) -> TimerMember | None:
        text = raw.decode() if isinstance(raw, bytes) else raw
        kind, sep, rest = text.partition("|")
        run_id, sep2, ident = rest.partition("|")
        if not (sep and sep2 and kind in ("t", "s") and run_id and ident):
            return None
        return cls(kind, run_id, ident)


class Keys:
    """The names of one deployment's keys: everything under ``prefix``."""

    def __init__(self, prefix: str = DEFAULT_PREFIX):
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"invalid key prefix {prefix!r}: use 1-64 letters, digits and _ . : -")
        self.prefix = prefix
        tag = "{" + prefix + "}"
        self.control = f"{tag}:control"
        self.cancels = f"{tag}:cancels"
        self.signals = f"{tag}:signals"
        self.llm = f"{tag}:llm"
        self.timers = f"{tag}:timers"
        self.timers_claimed = f"{tag}:timers:claimed"
        self.runs = f"{tag}:runs"
        self.workers = f"{tag}:workers"
        self.dead = f"{tag}:dead"
        self._failed_prefix = f"{tag}:failed:"
        self.cancel_channel = f"{prefix}:cancel"
        self._task_prefix = f"{tag}:task:"

    def acl_keys(self) -> str:
        """The key and channel patterns an ACL user of this prefix needs, as ACL rules: the run keys, the shared
        keys and the cancel channel (see :data:`ACL_COMMANDS` for the commands)."""
        return f"~{self.prefix}:run:* ~{{{self.prefix}}}:* &{self.cancel_channel}"

    # --- one run ---------------------------------------------------------------------

    def run(self, run_id: str) -> str:
        """The run's hash (state, version, plan, status and times)."""
        return f"{self.prefix}:run:{{{run_id}}}"

    def journal(self, run_id: str) -> str:
        """The run's journal stream: one entry per input event applied."""
        return f"{self.prefix}:run:{{{run_id}}}:journal"

    def tasks(self, run_id: str) -> str:
        """The run's hash of attempts in flight and their leases."""
        return f"{self.prefix}:run:{{{run_id}}}:tasks"

    def outbox(self, run_id: str) -> str:
        """The run's hash of decided commands not yet carried out, and of kept dispatch messages."""
        return f"{self.prefix}:run:{{{run_id}}}:outbox"

    def run_keys(self, run_id: str) -> list[str]:
        """``[run, journal, tasks, outbox]``: the KEYS of every per-run script, in that order."""
        base = f"{self.prefix}:run:{{{run_id}}}"
        return [base, base + ":journal", base + ":tasks", base + ":outbox"]

    # --- queues ------------------------------------------------------------------------

    def queue(self, worker: str | None) -> str:
        """The task stream of ``worker`` (``None``: the LLM stream, for ``llm`` dispatches)."""
        return self.llm if worker is None else self._task_prefix + worker

    def queue_of(self, command: dict[str, object]) -> str:
        """The stream a dispatch command goes to."""
        worker = command.get("worker")
        return self.queue(None if command.get("kind") == "llm" or not worker else str(worker))

    @staticmethod
    def trigger(stream: str, entry_id: str) -> str:
        """The name of one stream entry as a trigger: ``<entry id>@<crc32 of the stream>``.

        It begins every lease token taken under that entry (``<trigger>|<consumer>|<nonce>``), so whoever takes
        the entry over finds the tasks held under it; entry ids alone can repeat across streams."""
        return f"{entry_id}@{zlib.crc32(stream.encode()):08x}"

    def failures(self, trigger: str) -> str:
        """The counter of failed handlings of the stream entry named ``trigger`` (see :meth:`trigger`)."""
        return self._failed_prefix + trigger

    # --- timers ------------------------------------------------------------------------

    @staticmethod
    def kernel_timer(run_id: str, timer_id: str) -> str:
        """The timer set's member of a kernel timer of the run."""
        return TimerMember("t", run_id, timer_id).encode()

    @staticmethod
    def start_deadline(run_id: str, task_id: str) -> str:
        """The timer set's member of an attempt's schedule-to-start deadline."""
        return TimerMember("s", run_id, task_id).encode()
