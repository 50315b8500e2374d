"""orderedstream: single active consumer, ordered failover and a dead-letter path for Redis
Streams."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._aio import (
    AsyncBatchHandler,
    AsyncCoordinator,
    AsyncHandler,
    AsyncProducer,
    MessageStream,
)
from ._aio_member import AsyncTopicMember
from ._config import (
    ConsumerSettings,
    CoordinatorConfig,
    FixerConfig,
    FixerSettings,
    LeaseConfig,
    MemberConfig,
    RetryPolicy,
    TopicFixerConfig,
)
from ._coordinator import BatchHandler, Coordinator, Handler, Role
from ._deadletter import ParkedEntry
from ._dlq import DeadLetterCounts, DeadLetters, ListedEntry
from ._events import (
    AcquireRefused,
    BatchHandled,
    EntriesTrimmed,
    EntryHeld,
    EntryParked,
    Event,
    FixerPass,
    GroupRecreated,
    HandlerError,
    HandlerStalled,
    Hook,
    LeaseAcquired,
    LeaseLostEvent,
    LeaseReleased,
    OwnerConnectionGone,
    PushWatchDisabled,
    RepairFailed,
    ReplayCompleted,
    ServerRecovered,
    ServerUnavailable,
    Standby,
    TakeoverCompleted,
    WatchDisabled,
)
from ._fixer import Fixer, Repair, identity_repair
from ._keys import GroupKeys, hash_tag
from ._member import TopicMember
from ._message import Message
from ._producer import Producer
from ._server import connect_url
from ._topic import (
    AsyncTopicProducer,
    Topic,
    TopicProducer,
    create_topic,
    describe_topic,
    load_topic,
    partition_for,
)
from ._topic_fixer import TopicFixer
from .exceptions import (
    ConfigError,
    ConnectionFailed,
    Defer,
    GroupMissing,
    HandlerFailed,
    LeaseLost,
    MalformedRecord,
    NotOwner,
    OrderedStreamError,
    ReplicasNotAcknowledged,
    TopicMismatch,
    TopicMissing,
    Undecodable,
    Unrepairable,
    UnsupportedServer,
)

try:
    __version__ = version("orderedstream")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AcquireRefused",
    "AsyncBatchHandler",
    "AsyncCoordinator",
    "AsyncHandler",
    "AsyncProducer",
    "AsyncTopicMember",
    "AsyncTopicProducer",
    "BatchHandled",
    "BatchHandler",
    "ConfigError",
    "ConnectionFailed",
    "ConsumerSettings",
    "Coordinator",
    "CoordinatorConfig",
    "DeadLetterCounts",
    "DeadLetters",
    "Defer",
    "EntriesTrimmed",
    "EntryHeld",
    "EntryParked",
    "Event",
    "Fixer",
    "FixerConfig",
    "FixerPass",
    "FixerSettings",
    "GroupKeys",
    "GroupMissing",
    "GroupRecreated",
    "Handler",
    "HandlerError",
    "HandlerFailed",
    "HandlerStalled",
    "Hook",
    "LeaseAcquired",
    "LeaseConfig",
    "LeaseLost",
    "LeaseLostEvent",
    "LeaseReleased",
    "ListedEntry",
    "MalformedRecord",
    "MemberConfig",
    "Message",
    "MessageStream",
    "NotOwner",
    "OrderedStreamError",
    "OwnerConnectionGone",
    "ParkedEntry",
    "Producer",
    "PushWatchDisabled",
    "Repair",
    "RepairFailed",
    "ReplayCompleted",
    "ReplicasNotAcknowledged",
    "RetryPolicy",
    "Role",
    "ServerRecovered",
    "ServerUnavailable",
    "Standby",
    "TakeoverCompleted",
    "Topic",
    "TopicFixer",
    "TopicFixerConfig",
    "TopicMember",
    "TopicMismatch",
    "TopicMissing",
    "TopicProducer",
    "Undecodable",
    "Unrepairable",
    "UnsupportedServer",
    "WatchDisabled",
    "__version__",
    "connect_url",
    "create_topic",
    "describe_topic",
    "hash_tag",
    "identity_repair",
    "load_topic",
    "partition_for",
]
