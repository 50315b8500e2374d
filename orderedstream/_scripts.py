"""Loads ``lua/*.lua`` and gives each script one typed method.

Keys reach the scripts only through KEYS (computed by :mod:`._keys`).  A script that answers
``NOTOWNER`` raises :class:`~orderedstream.exceptions.NotOwner`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

from .exceptions import GroupMissing, NotOwner, OrderedStreamError

EVENTS_MAXLEN = 1000

# hiredis packs a whole command in one C call; redis-py encodes each argument in Python first
pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
    pack_command = _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is an optional extra
    pack_command = None

Encodable = str | bytes | int | float


def _load(name: str) -> str:
    """A script's text, with each ``--! include lib/x.lua`` line replaced by that file (Lua
    scripts sent to the server cannot load code of their own)."""
    folder = resources.files("orderedstream").joinpath("lua")
    text = folder.joinpath(f"{name}.lua").read_text("utf-8")
    lines = []
    for line in text.splitlines(keepends=True):
        if line.startswith("--! include "):
            part = folder
            for step in line.split()[2].split("/"):
                part = part.joinpath(step)
            lines.append(part.read_text("utf-8"))
        else:
            lines.append(line)
    return "".join(lines)


def script_names() -> list[str]:
    """Every ``lua/*.lua`` shipped in the package."""
    folder = resources.files("orderedstream").joinpath("lua")
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".lua"))


def translate(err: redis.ResponseError) -> OrderedStreamError | None:
    """Map a script's error reply to our error tree (None: not one of ours)."""
    text = str(err)
    if text.startswith("NOTOWNER"):
        return NotOwner(text)
    if text.startswith("NOGROUP"):
        return GroupMissing(f"{text} (was the stream or group deleted?)")
    return None


class Scripts:
    """The registered scripts; every call runs on the client passed in (or the default one)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._scripts: dict[str, Script] = {
            name: client.register_script(_load(name)) for name in script_names()
        }

    def sha(self, name: str) -> str:
        """The script's SHA1, loading it into the server's cache first."""
        script = self._scripts[name]
        self._client.script_load(script.script)
        return str(script.sha)

    def call_bulk(self, name: str, keys: Sequence[str], args: Sequence[Encodable]) -> Any:
        """Like :meth:`call`, for calls with thousands of arguments: packed by hiredis in one
        step (redis-py checks and encodes every argument in Python first)."""
        if pack_command is None:
            return self.call(name, keys, args)
        script = self._scripts[name]
        pool = self._client.connection_pool
        for _ in range(2):
            conn: Any = pool.get_connection()
            try:
                conn.send_packed_command(
                    [pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))])
                reply = conn.read_response()
            except redis.exceptions.NoScriptError:
                pool.release(conn)
                self._client.script_load(script.script)
                continue
            except redis.ResponseError as err:
                pool.release(conn)
                mapped = translate(err)
                if mapped is not None:
                    raise mapped from err
                raise
            except BaseException:
                conn.disconnect()
                pool.release(conn)
                raise
            pool.release(conn)
            return reply
        raise OrderedStreamError(f"script {name} vanished from the server's cache twice")

    def call(self, name: str, keys: Sequence[str], args: Sequence[Encodable],
             client: redis.Redis | None = None) -> Any:
        try:
            return self._scripts[name](keys=list(keys), args=list(args),
                                       client=client or self._client)
        except redis.ResponseError as err:
            mapped = translate(err)
            if mapped is not None:
                raise mapped from err
            raise
