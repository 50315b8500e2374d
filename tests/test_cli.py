"""The command line as an operator meets it, on real servers: every command fails in one line
with what to do (exit code 2, no traceback, no password), events are printed once, Ctrl+C and a
closed terminal end `demo` and `server` cleanly and leave no server and no directory behind,
the panels fit 80x24 with the newest events first, and the dead-letter commands (retry,
requeue, purge of the graveyard) say and do what an operator expects."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from orderedstream import Fixer, FixerConfig, GroupKeys, ParkedEntry, Unrepairable
from orderedstream.testing import ServerProcess, free_port, park_directly, read_records, wait_until

from .conftest import EXTERNAL_URL

PASSWORD = "s3cret-Pa55"
LONG_DURATION = re.compile(r"\d+\.\d{4,}")


def run_cli(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orderedstream", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd,
                          env=dict(os.environ, COLUMNS="80", **(env or {})))


def assert_one_line_error(out: subprocess.CompletedProcess[str], match: str) -> str:
    """Exit code 2, exactly one `error:` line on stderr matching ``match``, no traceback, and
    neither the password nor an unrounded duration anywhere."""
    both = out.stdout + out.stderr
    assert out.returncode == 2, both[-3000:]
    assert "Traceback" not in both, both[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, both[-3000:]
    assert re.search(match, errors[0]), errors[0]
    assert PASSWORD not in both
    return errors[0]


@pytest.fixture(scope="module")
def acl_server() -> Iterator[ServerProcess]:
    """A server of our own with two users: `ops` (everything, password PASSWORD) and `weak`
    (may connect and run INFO, nothing else)."""
    if EXTERNAL_URL:
        pytest.skip("needs a server the suite starts itself")
    with ServerProcess() as srv:
        client = srv.client()
        client.acl_setuser("ops", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"],
                           channels=["*"], commands=["+@all"])
        client.acl_setuser("weak", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"],
                           commands=["-@all", "+info", "+hello", "+ping", "+client|setname"])
        client.close()
        yield srv


def _url(srv: ServerProcess, user: str = "ops", password: str = PASSWORD) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{srv.port}/0"


COMMANDS = {
    "produce": ["produce", "--count", "3", "--rate", "0"],
    "consume": ["consume", "--max-messages", "1"],
    "fix": ["fix"],
    "status": ["status"],
    "status --watch": ["status", "--watch"],
    "dlq list": ["dlq", "list"],
    "dlq retry": ["dlq", "retry", "--all"],
    "dlq requeue": ["dlq", "requeue", "--all"],
    "demo": ["demo", "--duration", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_fails_in_one_line(acl_server: ServerProcess, command: str,
                                         tmp_path: Path) -> None:
    """Each command, for: a server that is down, a wrong password, an ACL that denies it
    (NOPERM), a URL that is not one (with a password in it), and (where a stream is read) a
    stream key that holds a string: one `error:` line saying what to do, exit code 2, no
    traceback, the password never printed."""
    argv = COMMANDS[command]
    stream = f"cli-{uuid.uuid4().hex[:8]}"
    base = [*argv, "--stream", stream]
    cases = {
        "down": (f"redis://u:{PASSWORD}@127.0.0.1:{free_port()}/0", r"cannot reach.*running"),
        "password": (_url(acl_server, password="wrong-" + PASSWORD), r"refused the credentials"),
        "acl": (_url(acl_server, "weak"), r"ACL does not allow"),
        "url": (f"http://u:{PASSWORD}@localhost:1/0", r"not a Redis URL"),
        "bad port": (f"redis://u:{PASSWORD}@localhost:notaport/0", r"cannot parse|Redis URL"),
    }
    if command != "demo":
        admin = acl_server.client()
        admin.set(stream, "a string")
        cases["wrongtype"] = (_url(acl_server), r"WRONGTYPE|not a stream|holds a string")
    for case, (url, match) in cases.items():
        out = run_cli(*base, "--redis-url", url, timeout=60)
        try:
            assert_one_line_error(out, match)
        except AssertionError as err:
            raise AssertionError(f"{command} / {case}: {err}") from err


@pytest.mark.parametrize("option", ["--handler", "--repair"])
def test_handler_module_errors_are_one_line(acl_server: ServerProcess, tmp_path: Path,
                                            option: str) -> None:
    """`consume --handler` / `fix --repair` naming a module with a syntax error, one that raises
    on import, or a missing function: one line naming the file and line or what is there."""
    command = "consume" if option == "--handler" else "fix"
    (tmp_path / "broken_mod.py").write_text("def handle(message):\n    return (\n")
    (tmp_path / "raising_mod.py").write_text("import os\nraise RuntimeError('no config')\n")
    (tmp_path / "fine_mod.py").write_text("def other(message):\n    pass\n")
    for spec, match in (("broken_mod:handle", r"syntax error in .*broken_mod\.py line \d"),
                        ("raising_mod:handle", r"RuntimeError: no config.*line 2"),
                        ("fine_mod:handle", r"has no 'handle' \(it has: other\)"),
                        ("no_such_mod:handle", r"cannot import 'no_such_mod'")):
        out = run_cli(command, option, spec, "--redis-url", _url(acl_server), cwd=tmp_path)
        assert_one_line_error(out, match)


def test_server_on_a_taken_port_fails_before_ready(acl_server: ServerProcess) -> None:
    """`server --port N` with N taken: one line, exit 2, and it never says "ready"."""
    out = run_cli("server", "--port", str(acl_server.port), timeout=30)
    assert_one_line_error(out, rf"port {acl_server.port} .* taken")
    assert "ready" not in out.stdout


def test_consume_prints_each_event_once_no_password_rounded(acl_server: ServerProcess,
                                                           tmp_path: Path) -> None:
    """A consumer whose handler fails once: `handler_failed` is printed once (not again by
    logging's last-resort handler), its start-up line shows the URL without the password, no
    duration has more than three decimals, and an entry it did not produce is printed with its
    fields (not `seq= ?`)."""
    stream = f"cli-{uuid.uuid4().hex[:8]}"
    (tmp_path / "flaky_mod.py").write_text(
        "from orderedstream.cli import demo_handler\n"
        "seen = set()\n"
        "def handle(message):\n"
        "    if message.id not in seen:\n"
        "        seen.add(message.id)\n"
        "        raise ValueError('first time fails')\n"
        "    demo_handler(message)\n")
    client = acl_server.client()
    client.xadd(stream, {"order": "42", "amount": "7"})
    out = run_cli("consume", "--stream", stream, "--group", "g", "--redis-url",
                  _url(acl_server), "--handler", "flaky_mod:handle", "--max-messages", "1",
                  cwd=tmp_path)
    both = out.stdout + out.stderr
    assert out.returncode == 0, both
    assert both.count("handler_failed") == 1, both
    assert PASSWORD not in both and f"ops:***@127.0.0.1:{acl_server.port}" in both
    assert not LONG_DURATION.search(both), both
    assert "order=42 amount=7" in out.stdout and "seq=" not in out.stdout
    client.delete(stream, *GroupKeys(stream, "g").all())


def test_event_durations_are_rounded() -> None:
    """An event's describe() shows durations rounded (never `0.4850200000419136`)."""
    from orderedstream._events import TakeoverCompleted

    event = TakeoverCompleted(stream="s", group="g", consumer="c", epoch=7, claimed=3,
                              consumers_deleted=0, trimmed=0, duration_ms=0.4850200000419136)
    assert "duration_ms=0.5" in event.describe()
    assert not LONG_DURATION.search(event.describe())


def _leftovers(tmp: Path) -> list[str]:
    """Directories left in ``tmp`` and processes whose command line names ``tmp``."""
    left = [p.name for p in tmp.iterdir()] if tmp.exists() else []
    procs = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return left + [line for line in procs.splitlines()
                   if str(tmp) in line and "ps -eo" not in line]


@pytest.mark.slow
def test_ctrl_c_ends_the_demo_with_its_verdict(tmp_path: Path) -> None:
    """Ctrl+C (SIGINT to the demo's process group, as a terminal sends it) ends `demo` with its
    verdict and the exit code by it, without a traceback; its server, its processes and its
    temporary directories are gone afterwards."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orderedstream", "demo", "--duration", "120", "--kill-every",
         "1.5", "--rate", "100", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, env=dict(os.environ, TMPDIR=str(tmp)))
    try:
        def handled_some() -> bool:
            records = list(tmp.glob("orderedstream-demo-*/handled.jsonl"))
            return bool(records) and records[0].stat().st_size > 2000
        wait_until(handled_some, 30, 0.1, message="the demo's consumers handling")

        def failed_over() -> bool:  # a kill happened: another consumer process handles now
            records = list(tmp.glob("orderedstream-demo-*/handled.jsonl"))
            return bool(records) and len({r["pid"] for r in read_records(records[0])}) >= 2
        wait_until(failed_over, 30, 0.1, message="a kill and a failover")
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "Traceback" not in stderr, stderr[-3000:]
    result = json.loads(stdout)
    assert result["interrupted"] is True
    assert result["lost"] == 0 and result["out_of_order"] == 0, result
    assert proc.returncode == 0
    wait_until(lambda: not _leftovers(tmp), 10, message="no directory, no process left")


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True).stdout


needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


@needs_tmux
@pytest.mark.slow
@pytest.mark.parametrize("command", ["server", "demo"])
def test_closing_the_terminal_leaves_nothing_behind(tmp_path: Path, command: str) -> None:
    """`server` and `demo` in a tmux terminal: closing it (kill-session: SIGHUP) stops the
    server, the demo's processes, and removes every directory they made in $TMPDIR."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    session = f"oshup{os.getpid()}{command}"
    argv = "server" if command == "server" else "demo --duration 120 --rate 100"
    _tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24",
          f"env TMPDIR={tmp} {sys.executable} -m orderedstream {argv}")
    try:
        ready = "ready at" if command == "server" else "owner consumer-"
        wait_until(lambda: ready in _tmux("capture-pane", "-p", "-t", session), 30, 0.1,
                   message=f"{command} running")
        assert any("orderedstream-server-" in line for line in _leftovers(tmp))
    finally:
        _tmux("kill-session", "-t", session)
    wait_until(lambda: not _leftovers(tmp), 45, 0.2,
               message=f"{command}: no directory, no process left")


@needs_tmux
@pytest.mark.slow
def test_status_watch_at_80x24_shows_the_failover_just_caused(server: ServerProcess,
                                                              stream: str,
                                                              tmp_path: Path) -> None:
    """`status --watch` in an 80x24 terminal, after several failovers: the current owner's
    epoch is on screen in the timeline too (newest events first), no line is cut mid-id."""
    if EXTERNAL_URL:
        pytest.skip("needs a server the suite starts itself")
    client = server.client()
    client.xadd(stream, {"seq": "1"})
    procs: list[subprocess.Popen[bytes]] = []

    def consumer(n: int) -> None:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "orderedstream", "consume", "--redis-url", server.url,
             "--stream", stream, "--group", "g", "--name", f"watcher-c{n}", "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    keys = GroupKeys(stream, "g")

    def owner_pid() -> int:
        return int(client.hget(keys.owner, "pid") or 0) if client.exists(keys.lease) else 0

    session = f"osstatus{os.getpid()}"
    try:
        for n in range(3):
            consumer(n)
        for n in range(3, 7):  # four failovers: more events than an 80x24 screen holds
            pid = wait_until(owner_pid, 20, message="an owner")
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda p=pid: owner_pid() not in (0, p), 20, message="a new owner")
            consumer(n)
        _tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24",
              f"{sys.executable} -m orderedstream status --watch --redis-url {server.url} "
              f"--stream {stream} --group g")
        epoch = int(client.get(keys.epoch) or 0)
        screens: list[str] = []

        def shows_it() -> bool:
            screen = _tmux("capture-pane", "-p", "-t", session)
            screens.append(screen)
            head = re.search(r"owner (watcher-c\d)\s+epoch (\d+)", screen)
            return (head is not None and int(head.group(2)) == epoch
                    and len(re.findall(rf"(acquired|takeover)\s+{head.group(1)}\s+{epoch}",
                                       screen)) >= 1)

        try:
            wait_until(shows_it, 20, 0.2, message="the newest failover on the 80x24 screen")
        finally:
            (tmp_path / "screen.txt").write_text(screens[-1] if screens else "")
        assert all(len(line) <= 80 for line in screens[-1].splitlines())
    finally:
        _tmux("kill-session", "-t", session)
        for p in procs:
            if p.poll() is None:
                p.terminate()
            p.wait(10)


# -- dead letters ----------------------------------------------------------------------------

def _park(client: redis.Redis, stream: str, n: int, due_ms: int) -> list[str]:
    client.xgroup_create(stream, "g", id="$", mkstream=True)
    keys = GroupKeys(stream, "g")
    entries = [ParkedEntry(id=f"{1795551038849 + i}-{i}", origin_id=f"{1795551038849 + i}-{i}",
                           group="g", reason="bad payload " * 4,
                           raw={b"payload": b"x" * 120, b"seq": str(i).encode()})
               for i in range(n)]
    ids = park_directly(client, keys, entries)
    client.zadd(keys.delay, dict.fromkeys(ids, due_ms))
    return ids


def test_dlq_retry_is_due_now_and_ids_never_wrap(server: ServerProcess, client: redis.Redis,
                                                 stream: str) -> None:
    """`dlq retry ID` makes the entry due now on the server's clock (`dlq list` says "due now",
    `status` no absurd negative time); at 80 columns every id is whole on one line."""
    server_now = int(client.time()[0]) * 1000
    ids = _park(client, stream, 3, server_now + 3_600_000)
    url = ["--redis-url", server.url, "--stream", stream, "--group", "g"]
    out = run_cli("dlq", "retry", ids[0], *url)
    assert out.returncode == 0, out.stderr
    listed = json.loads(run_cli("dlq", "list", "--json", *url).stdout)
    due = {e["id"]: e["due_in_ms"] for e in listed["entries"]}
    assert -5000 < due[ids[0]] <= 0, due
    assert due[ids[1]] > 3_000_000
    table = run_cli("dlq", "list", *url).stdout
    for entry_id in ids:
        assert entry_id in table, table
    # "due now" within a second of the retry; a slow machine may list it later, as overdue
    assert re.search(r"due now|overdue \d", table) and "in 60 min" in table, table
    assert not re.search(r"(?<![\w-])-\d{6,}", table), table
    status = run_cli("status", *url).stdout
    assert re.search(r"next due (now|overdue \d)", status), status
    assert not re.search(r"(?<![\w-])-\d{6,}", status), status


def test_graveyard_requeue_and_purge(server: ServerProcess, client: redis.Redis,
                                     stream: str) -> None:
    """`dlq requeue ID` puts a buried entry back into the delay set, due now, with its record;
    a fixer then repairs and re-streams it.  `dlq purge --graveyard --all` empties the
    graveyard."""
    ids = _park(client, stream, 3, 0)
    keys = GroupKeys(stream, "g")

    def refuse(entry: ParkedEntry) -> dict[str, str]:
        raise Unrepairable("no idea")

    fixer = Fixer(FixerConfig(stream=stream, group="g"), refuse, client)
    fixer.fix_once()
    assert client.xlen(keys.graveyard) == 3 and client.zcard(keys.delay) == 0
    url = ["--redis-url", server.url, "--stream", stream, "--group", "g"]
    out = run_cli("dlq", "requeue", ids[1], *url)
    assert out.returncode == 0, out.stderr
    assert "1 buried entry back in the delay set" in out.stdout
    assert client.xlen(keys.graveyard) == 2
    assert client.zrange(keys.delay, 0, -1) == [ids[1].encode()]
    assert int(client.zscore(keys.delay, ids[1]) or 0) <= int(client.time()[0]) * 1000 + 1000
    Fixer(FixerConfig(stream=stream, group="g"), lambda e: e.fields, client).fix_once()
    [(_, fields)] = client.xrange(stream)
    assert fields[b"os-origin-id"] == ids[1].encode() and fields[b"seq"] == b"1"
    out = run_cli("dlq", "purge", "--graveyard", "--all", *url)
    assert out.returncode == 0 and "2 buried entries purged" in out.stdout, out.stdout
    assert client.xlen(keys.graveyard) == 0


def test_a_missing_group_is_named(server: ServerProcess, client: redis.Redis,
                                  stream: str) -> None:
    """`status` and `dlq list` with a mistyped --group name it and list the groups there are."""
    client.xgroup_create(stream, "g", id="$", mkstream=True)
    client.xgroup_create(stream, "g2", id="$")
    for argv in (["status"], ["dlq", "list"]):
        out = run_cli(*argv, "--redis-url", server.url, "--stream", stream, "--group", "gg")
        assert_one_line_error(out, rf"group 'gg' does not exist on stream '{stream}'; "
                                   r"groups: g, g2")
