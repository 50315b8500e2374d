"""orderedstream: single active consumer, ordered failover and a dead-letter path for Redis
Streams."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._config import CoordinatorConfig, LeaseConfig, RetryPolicy
from ._coordinator import Coordinator, Handler, Role
from ._events import (
    BatchHandled,
    EntriesTrimmed,
    EntryParked,
    Event,
    HandlerError,
    Hook,
    LeaseAcquired,
    LeaseLostEvent,
    LeaseReleased,
    OwnerConnectionGone,
    ReplayCompleted,
    Standby,
    TakeoverCompleted,
    WatchDisabled,
)
from ._keys import GroupKeys, hash_tag
from ._message import Message
from ._producer import Producer
from .exceptions import (
    ConfigError,
    ConnectionFailed,
    Defer,
    GroupMissing,
    HandlerFailed,
    LeaseLost,
    NotOwner,
    OrderedStreamError,
    UnsupportedServer,
)

try:
    __version__ = version("orderedstream")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "BatchHandled",
    "ConfigError",
    "ConnectionFailed",
    "Coordinator",
    "CoordinatorConfig",
    "Defer",
    "EntriesTrimmed",
    "EntryParked",
    "Event",
    "GroupKeys",
    "GroupMissing",
    "Handler",
    "HandlerError",
    "HandlerFailed",
    "Hook",
    "LeaseAcquired",
    "LeaseConfig",
    "LeaseLost",
    "LeaseLostEvent",
    "LeaseReleased",
    "Message",
    "NotOwner",
    "OrderedStreamError",
    "OwnerConnectionGone",
    "Producer",
    "ReplayCompleted",
    "RetryPolicy",
    "Role",
    "Standby",
    "TakeoverCompleted",
    "UnsupportedServer",
    "WatchDisabled",
    "__version__",
    "hash_tag",
]
