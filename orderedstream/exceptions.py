"""The whole error tree of orderedstream.

Every error the library raises derives from :class:`OrderedStreamError`.  Errors at the
redis-py boundary are re-raised from the original exception (``raise ... from err``).
:class:`Defer` is not an error: it is control flow a handler raises on purpose.
"""

from __future__ import annotations


class OrderedStreamError(Exception):
    """Root of every error raised by orderedstream."""


class ConfigError(OrderedStreamError, ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


class ConnectionFailed(OrderedStreamError):
    """The server could not be reached or the URL is wrong; the message says what to check."""


class UnsupportedServer(OrderedStreamError):
    """The server is too old or not a Redis/Valkey server; the message says what to run instead."""


class NotOwner(OrderedStreamError):
    """A fenced operation was refused: the caller's lease token is not the current one.

    Raised when a former owner (a "zombie") tries to read, ack, claim or defer after another
    consumer took the stream over.  Nothing was changed on the server.
    """


class LeaseLost(OrderedStreamError):
    """This consumer no longer holds the lease: it expired, was taken over or was not renewed."""


class ReplicasNotAcknowledged(OrderedStreamError):
    """The lease was acquired on the primary, but fewer replicas than ``LeaseConfig.wait_replicas``
    acknowledged it (``WAIT``) in time, so the term was ended again and this consumer does not own.

    A promoted replica that never received the acquisition could hand the same epoch out again;
    refusing to own is what keeps the epoch promise without trusting clocks.  Retry after a
    pause; the message says what to check.
    """

    def __init__(self, epoch: int, acknowledged: int, required: int, timeout_ms: int) -> None:
        super().__init__(
            f"acquired epoch {epoch} but only {acknowledged} of {required} replica(s) "
            f"acknowledged it within {timeout_ms} ms, so the term was ended again and this "
            "consumer does not own the group. Check the replicas: `INFO replication` on the "
            "primary (connected_slaves, each replica's lag), master_link_status on each replica; "
            "or lower --wait-replicas / LeaseConfig.wait_replicas.")
        self.epoch = epoch
        self.acknowledged = acknowledged
        self.required = required
        self.timeout_ms = timeout_ms


class TopicMismatch(OrderedStreamError):
    """A topic exists with another number of partitions (or routing hash) than asked for.

    Its partition count is fixed at creation: every key's partition is its hash modulo that
    count, so changing it would send a key's later entries to another partition than its
    earlier ones, and per-key order would break.
    """

    def __init__(self, topic: str, have: int, want: int, detail: str = "") -> None:
        super().__init__(
            detail or f"topic {topic!r} exists with {have} partitions, not {want}: a key's "
            "partition is its hash modulo the partition count, so changing the count would "
            "route a key's new entries to another partition than its earlier ones and break "
            f"per-key order. Keep {have} partitions, or create a new topic and move the "
            "producers over once the old one is drained.")
        self.topic = topic
        self.have = have
        self.want = want


class TopicMissing(OrderedStreamError):
    """The topic has no metadata on the server: it was never created (or was deleted)."""

    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic!r} does not exist: create it first with `orderedstream "
                         f"topic create {topic} --partitions P` (or create_topic())")
        self.topic = topic


class GroupMissing(OrderedStreamError):
    """The consumer group (or the stream) was deleted while the coordinator was running."""


class HandlerFailed(OrderedStreamError):
    """The handler kept failing on one entry until its retry budget ran out.

    Raised from :meth:`Coordinator.run` when the retry policy says ``on_exhausted="stop"``.
    The entry stays pending, so nothing is lost: the next owner starts with it.
    """

    def __init__(self, entry_id: str, attempts: int, error: BaseException) -> None:
        super().__init__(f"handler failed {attempts} times on entry {entry_id}: {error!r}")
        self.entry_id = entry_id
        self.attempts = attempts
        self.error = error


class MalformedRecord(OrderedStreamError):
    """A parked record that is not what orderedstream writes (hand-edited, truncated, foreign);
    the fixer buries it in the graveyard with this reason instead of failing on it again."""


class Unrepairable(OrderedStreamError):
    """Raise from a repair function to send the entry to the graveyard at once (no retries)."""


class Defer(Exception):
    """Raised by a handler to park the current entry in the delay set for later repair.

    ``reason`` is stored with the parked entry and shown to operators; ``delay_ms`` is how
    long to wait (on the server's clock) before the fixer may take it.
    """

    def __init__(self, reason: str, delay_ms: int = 1000) -> None:
        super().__init__(reason)
        if delay_ms < 0:
            raise ConfigError(f"Defer delay_ms must be >= 0, got {delay_ms}")
        self.reason = reason
        self.delay_ms = delay_ms


# -- internal control flow (never raised to a caller of the public API) ---------------------


class StopRequested(Exception):
    """Internal: unwind the owner loop because ``stop()`` was called."""


class ResyncNeeded(Exception):
    """Internal: a read-ahead's bodies do not match what the fenced script delivered (an entry
    was deleted in between, the group's last-delivered id was not where the reader thought, or
    the script cache was flushed); the reader reads what was delivered back from its own
    pending list instead."""


class BudgetSpent(Exception):
    """Internal: the ``max_messages`` budget of ``start()``/``run()`` is spent."""


class Undecodable(Defer):
    """Raised on first access to ``Message.fields`` of an entry that is not UTF-8; the
    coordinator parks the entry with this reason (its raw bytes are kept)."""
