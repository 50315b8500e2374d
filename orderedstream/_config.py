"""Frozen, validated configuration.  Durations are in milliseconds."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from typing import Literal

import attrs

from .exceptions import ConfigError

OnExhausted = Literal["park", "stop", "block"]
MIN_PARK_DELAY_MS = 100


def default_consumer_name() -> str:
    """``host-pid-xxxx``: unique per process, readable in XINFO and CLIENT LIST."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{attribute.name} must be > 0, got {value!r}")


def _non_empty(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ConfigError(f"{attribute.name} must not be empty")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How a handler that raises is retried in place (order is never skipped).

    ``max_attempts=None`` retries forever.  When a bounded budget runs out:
    ``"park"`` moves the entry to the delay set (the dead-letter path), ``"stop"`` stops the
    coordinator and hands the lease on with the entry still pending, ``"block"`` keeps
    retrying at the longest backoff.
    """

    max_attempts: int | None = attrs.field(default=5)
    initial_backoff_ms: int = attrs.field(default=100, validator=_positive)
    max_backoff_ms: int = attrs.field(default=5_000, validator=_positive)
    multiplier: float = attrs.field(default=2.0)
    on_exhausted: OnExhausted = attrs.field(default="park")
    park_delay_ms: int = attrs.field(default=1_000)
    max_deliveries: int | None = attrs.field(default=20)
    """An entry the server has delivered more often than this without an ack (the process
    handling it died on it again and again: a segfault, an OOM kill) is parked with the reason
    instead of being handed out again, so it cannot stop the group.  Counted from the server's
    delivery count; None: no limit."""

    @max_deliveries.validator
    def _check_deliveries(self, attribute: attrs.Attribute[int | None],
                          value: int | None) -> None:
        if value is not None and value < 3:
            # an entry behind the one a process died on can be delivered 3 times without a
            # handler call having failed on it (see lua/read.lua)
            raise ConfigError(f"max_deliveries must be >= 3 or None, got {value!r}")

    min_park_delay_ms: int = attrs.field(default=MIN_PARK_DELAY_MS)
    """Floor on every park delay (``Defer(delay_ms=0)``, undecodable entries): an entry that
    fails again at once after each repair cycles park -> repair -> re-stream at most this often
    (see also ``FixerConfig.max_parks``)."""

    @min_park_delay_ms.validator
    def _check_min_park(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < 0:
            raise ConfigError(f"min_park_delay_ms must be >= 0, got {value!r}")

    @max_attempts.validator
    def _check_attempts(self, attribute: attrs.Attribute[int | None], value: int | None) -> None:
        if value is not None and value < 1:
            raise ConfigError(f"max_attempts must be >= 1 or None, got {value!r}")

    @multiplier.validator
    def _check_multiplier(self, attribute: attrs.Attribute[float], value: float) -> None:
        if value < 1.0:
            raise ConfigError(f"multiplier must be >= 1.0, got {value!r}")

    @on_exhausted.validator
    def _check_exhausted(self, attribute: attrs.Attribute[str], value: str) -> None:
        if value not in ("park", "stop", "block"):
            raise ConfigError(f"on_exhausted must be 'park', 'stop' or 'block', got {value!r}")

    def backoff_ms(self, attempt: int) -> int:
        """Wait before retry number ``attempt`` (1-based: after the first failure)."""
        delay = self.initial_backoff_ms * self.multiplier ** (attempt - 1)
        return int(min(delay, self.max_backoff_ms))


@attrs.frozen(kw_only=True)
class LeaseConfig:
    """The owner's lease.

    ``ttl_ms`` bounds how long a silent (paused, partitioned) owner blocks failover.  The owner
    renews every ``ttl_ms / 3`` and counts its lease valid only until the send time of its last
    successful renew + ``ttl_ms`` - ``margin_ms`` on its monotonic clock.

    ``wait_replicas`` (opt-in): after acquiring, ``WAIT`` for that many replicas to acknowledge
    the new term, on the connection that acquired it, for up to ``wait_replicas_timeout_ms``
    (default ``ttl_ms / 3``); fewer acknowledged: the term is ended again and acquiring raises
    :class:`~orderedstream.exceptions.ReplicasNotAcknowledged`.  A replica that acknowledged
    carries the epoch past a promotion with no assumption about clocks.

    ``watch_connection``: standbys watch the owner's heartbeat connection and end its term the
    moment it is gone (fenced).  With ``watch_push`` (default) the server tells them by push
    (``CLIENT TRACKING ... REDIRECT``, RESP3) at the first write to the stream after the owner
    died, and the ``CLIENT LIST`` poll, which then only covers a stream nobody writes to, runs
    every ``watch_push_interval_ms``; without push (off, or refused by an ACL) it runs every
    ``watch_interval_ms``.
    """

    ttl_ms: int = attrs.field(default=3_000, validator=_positive)
    margin_ms: int | None = attrs.field(default=None)
    watch_connection: bool = True
    watch_interval_ms: int = attrs.field(default=25, validator=_positive)
    watch_push: bool = True
    watch_push_interval_ms: int = attrs.field(default=250, validator=_positive)
    wait_replicas: int = attrs.field(default=0)
    wait_replicas_timeout_ms: int | None = attrs.field(default=None)

    @ttl_ms.validator
    def _check_ttl(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < 300:
            raise ConfigError(f"lease ttl_ms must be >= 300 (renewals need time), got {value}")

    @margin_ms.validator
    def _check_margin(self, attribute: attrs.Attribute[int | None], value: int | None) -> None:
        if value is not None and not 0 <= value < self.ttl_ms // 2:
            raise ConfigError(f"margin_ms must be in [0, ttl_ms/2), got {value}")

    @wait_replicas.validator
    def _check_wait_replicas(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < 0:
            raise ConfigError(f"wait_replicas must be >= 0, got {value}")

    @wait_replicas_timeout_ms.validator
    def _check_wait_timeout(self, attribute: attrs.Attribute[int | None],
                            value: int | None) -> None:
        if value is not None and not 0 < value <= self.ttl_ms // 2:
            raise ConfigError(f"wait_replicas_timeout_ms must be in (0, ttl_ms/2] (the wait "
                              f"spends the new term's validity), got {value}")

    @property
    def effective_wait_timeout_ms(self) -> int:
        if self.wait_replicas_timeout_ms is not None:
            return self.wait_replicas_timeout_ms
        return max(self.ttl_ms // 3, 1)

    @property
    def effective_margin_ms(self) -> int:
        return self.margin_ms if self.margin_ms is not None else max(self.ttl_ms // 10, 20)

    @property
    def renew_interval_ms(self) -> int:
        return max(self.ttl_ms // 3, 50)


def _check_name(what: str, value: str) -> None:
    if ":" in value or any(ch.isspace() for ch in value):
        raise ConfigError(f"{what} name may not contain ':' or spaces, got {value!r}")


@attrs.frozen(kw_only=True)
class ConsumerSettings:
    """How a consumer reads, handles and holds its lease: what a
    :class:`CoordinatorConfig` (one stream) and a :class:`MemberConfig` (every partition of a
    topic) share."""

    batch_size: int = attrs.field(default=100, validator=_positive)
    block_ms: int = attrs.field(default=1_000, validator=_positive)
    socket_timeout_ms: int = attrs.field(default=5_000, validator=_positive)
    claim_page: int = attrs.field(default=1_000, validator=_positive)
    create_group_from: str = "0"
    lease: LeaseConfig = attrs.field(factory=LeaseConfig)
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    handler_timeout_ms: int = attrs.field(default=300_000, validator=_positive)
    """A handler call that runs longer than this (Kafka's max.poll.interval.ms) makes the owner
    emit ``HandlerStalled``, stop renewing and give its lease up, so a standby takes over within
    this timeout + the lease TTL; nothing more of that term is handed out or acknowledged."""
    hold_key_field: str | None = None
    """Hold-key mode: the field that carries each entry's ordering key.  While an entry with
    key K is parked, later entries with key K are parked behind it, and come back after it, in
    order, when it is repaired.  None (default): later entries flow on while one is parked."""

    def settings(self) -> dict[str, object]:
        """These settings as keywords (to build another config with the same ones)."""
        return {f.name: getattr(self, f.name) for f in attrs.fields(ConsumerSettings)}


@attrs.frozen(kw_only=True)
class CoordinatorConfig(ConsumerSettings):
    """Everything a :class:`~orderedstream.Coordinator` needs, validated on build."""

    stream: str = attrs.field(validator=_non_empty)
    group: str = attrs.field(validator=_non_empty)
    consumer: str = attrs.field(factory=default_consumer_name, validator=_non_empty)

    @consumer.validator
    def _check_consumer(self, attribute: attrs.Attribute[str], value: str) -> None:
        _check_name("consumer", value)

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: object) -> CoordinatorConfig:
        """Build from ``ORDEREDSTREAM_*`` variables (``STREAM``, ``GROUP``, ``CONSUMER``,
        ``BATCH``, ``LEASE_TTL_MS``); keyword overrides win."""
        values: dict[str, object] = {}
        if "ORDEREDSTREAM_STREAM" in env:
            values["stream"] = env["ORDEREDSTREAM_STREAM"]
        if "ORDEREDSTREAM_GROUP" in env:
            values["group"] = env["ORDEREDSTREAM_GROUP"]
        if "ORDEREDSTREAM_CONSUMER" in env:
            values["consumer"] = env["ORDEREDSTREAM_CONSUMER"]
        try:
            if "ORDEREDSTREAM_BATCH" in env:
                values["batch_size"] = int(env["ORDEREDSTREAM_BATCH"])
            if "ORDEREDSTREAM_LEASE_TTL_MS" in env:
                values["lease"] = LeaseConfig(ttl_ms=int(env["ORDEREDSTREAM_LEASE_TTL_MS"]))
        except ValueError as err:
            raise ConfigError(f"invalid number in environment: {err}") from err
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


@attrs.frozen(kw_only=True)
class MemberConfig(ConsumerSettings):
    """One member of a consumer group of a partitioned topic
    (:class:`~orderedstream.TopicMember`): it owns some of the topic's partitions and stands by
    for the others.  Every partition is served with these settings, as a
    :class:`CoordinatorConfig` would serve one stream (:meth:`partition`)."""

    topic: str = attrs.field(validator=_non_empty)
    group: str = attrs.field(validator=_non_empty)
    name: str = attrs.field(factory=default_consumer_name, validator=_non_empty)
    """The member's name: also its consumer name in every partition's group."""
    rebalance_grace_ms: int = attrs.field(default=2_000, validator=_positive)
    """A partition whose target member has not taken it this long after it became free is
    taken by another live member (so none stays without an owner)."""

    @name.validator
    def _check_member(self, attribute: attrs.Attribute[str], value: str) -> None:
        _check_name("member", value)

    def __attrs_post_init__(self) -> None:
        if self.lease.wait_replicas:
            raise ConfigError("wait_replicas is not supported by topic members yet")

    def partition(self, stream: str) -> CoordinatorConfig:
        """The configuration this member serves partition stream ``stream`` with."""
        return CoordinatorConfig(stream=stream, group=self.group, consumer=self.name,
                                 **self.settings())  # type: ignore[arg-type]


@attrs.frozen(kw_only=True)
class FixerSettings:
    """How a fixer claims, repairs and backs off: what a :class:`FixerConfig` (one stream) and
    a :class:`TopicFixerConfig` (every partition of a topic) share.

    ``visibility_ms`` is how long a claimed entry stays invisible to other fixers: a fixer that
    dies mid-batch has its entries offered again after it.  Set it well above the time a batch
    of repairs takes.  A repair that raises is tried again after ``initial_backoff_ms`` *
    ``multiplier`` ** (n - 1), up to ``max_backoff_ms``; after ``max_attempts`` failures the entry
    goes to the graveyard.
    """

    name: str = attrs.field(factory=lambda: "fixer-" + default_consumer_name(),
                            validator=_non_empty)
    batch_size: int = attrs.field(default=500, validator=_positive)
    visibility_ms: int = attrs.field(default=30_000, validator=_positive)
    max_attempts: int = attrs.field(default=5, validator=_positive)
    initial_backoff_ms: int = attrs.field(default=1_000, validator=_positive)
    max_backoff_ms: int = attrs.field(default=300_000, validator=_positive)
    multiplier: float = 2.0
    max_wait_ms: int = attrs.field(default=1_000, validator=_positive)
    """Longest sleep between passes when nothing is due (new parks wake a :class:`Fixer`
    earlier; a :class:`TopicFixer` looks at each partition at least this often)."""
    socket_timeout_ms: int = attrs.field(default=5_000, validator=_positive)
    max_parks: int = attrs.field(default=10, validator=_positive)
    """An entry parked more often than this (repaired and re-streamed, then parked again each
    time) goes to the graveyard instead of being repaired again."""

    def backoff_ms(self, failures: int) -> int:
        delay = self.initial_backoff_ms * self.multiplier ** max(failures - 1, 0)
        return int(min(delay, self.max_backoff_ms))

    def settings(self) -> dict[str, object]:
        """These settings as keywords (to build another config with the same ones)."""
        return {f.name: getattr(self, f.name) for f in attrs.fields(FixerSettings)}


@attrs.frozen(kw_only=True)
class FixerConfig(FixerSettings):
    """Everything a :class:`~orderedstream.Fixer` needs (one stream's parked entries),
    validated on build; the settings are :class:`FixerSettings`'."""

    stream: str = attrs.field(validator=_non_empty)
    group: str = attrs.field(validator=_non_empty)


@attrs.frozen(kw_only=True)
class TopicFixerConfig(FixerSettings):
    """Everything a :class:`~orderedstream.TopicFixer` needs: the parked entries of ``group``
    on every partition of ``topic``, each fixed with these settings, as a :class:`FixerConfig`
    would fix one stream (:meth:`partition`)."""

    topic: str = attrs.field(validator=_non_empty)
    group: str = attrs.field(validator=_non_empty)

    def partition(self, stream: str) -> FixerConfig:
        """The configuration partition stream ``stream`` is fixed with."""
        return FixerConfig(stream=stream, group=self.group,
                           **self.settings())  # type: ignore[arg-type]
