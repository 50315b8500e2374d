"""The README's access-control rules and TLS setup, on real servers: each role (consumer,
fixer, operator) works under exactly the documented `ACL SETUSER` rules and no more (a consumer
cannot purge dead letters), and producer, consumer and status work over `rediss://` against
Debian's redis-server with a certificate the test makes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from orderedstream import Coordinator, CoordinatorConfig, GroupKeys
from orderedstream.testing import ServerProcess, free_port, make_tls_files, wait_until

from .conftest import EXTERNAL_URL

ROOT = Path(__file__).resolve().parent.parent
STREAM = "orders"  # the README's rules name this stream's keys


STREAM_ROLES = ("consumer", "fixer", "operator")


def documented_rules(roles: tuple[str, ...] = STREAM_ROLES) -> dict[str, list[str]]:
    """role -> the arguments of its `ACL SETUSER` line in the README, for ``roles`` (the
    single-stream ones by default; the topic roles have lines of their own)."""
    text = (ROOT / "README.md").read_text()
    lines = dict(re.findall(r"^ACL SETUSER ([\w-]+) (.*)$", text, re.M))
    missing = set(roles) - set(lines)
    assert not missing, f"the README has no ACL SETUSER line for {sorted(missing)}"
    return {role: lines[role].split() for role in roles}


def set_user(client: redis.Redis, name: str, rules: list[str]) -> None:
    """``ACL SETUSER name reset *rules``, leaving out the rules naming a command this server
    does not have (Redis 7.0 has no ``client|setinfo``: orderedstream does not need it there,
    as the README says)."""
    rules = list(rules)
    while True:
        try:
            client.execute_command("ACL", "SETUSER", name, "reset", *rules)
            return
        except redis.ResponseError as err:
            unknown = re.search(r"modifier '([^']+)'", str(err))
            if unknown is None or "unknown command" not in str(err).lower():
                raise
            rules.remove(unknown.group(1))


def cli(url: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orderedstream", *argv, "--redis-url", url,
                           "--stream", STREAM, "--group", "workers"], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, COLUMNS="120"))


@pytest.fixture
def acl_server() -> Iterator[ServerProcess]:
    if EXTERNAL_URL:
        pytest.skip("needs a server the suite starts itself")
    with ServerProcess() as srv:
        yield srv


@pytest.mark.slow
def test_each_role_works_under_the_documented_acl(acl_server: ServerProcess,
                                                  tmp_path: Path) -> None:
    """With the README's rules: two consumers (one killed: takeover and claim), a fixer that
    repairs what they parked, and every operator command all work; the consumer user's
    `dlq purge` is refused in one line (NOPERM)."""
    rules = documented_rules()
    admin = acl_server.client()
    urls = {}
    for role, args in rules.items():
        password = f"{role}-pw"
        args = [f">{password}" if a.startswith(">") else a for a in args]
        set_user(admin, role, args)
        urls[role] = f"redis://{role}:{password}@127.0.0.1:{acl_server.port}/0"
    produced = cli(acl_server.url, "produce", "--count", "100", "--rate", "0",
                   "--corrupt-every", "10")
    assert produced.returncode == 0, produced.stderr
    env = dict(os.environ, ORDEREDSTREAM_RECORD=str(tmp_path / "rec.jsonl"),
               ORDEREDSTREAM_WORK_MS="20")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    keys = GroupKeys(STREAM, "workers")

    def start(name: str, *argv: str, role: str = "consumer") -> None:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "orderedstream", *argv, "--redis-url", urls[role],
             "--stream", STREAM, "--group", "workers"], env=env, stdout=log, stderr=log)

    def owner_pid() -> int:
        return int(admin.hget(keys.owner, "pid") or 0) if admin.exists(keys.lease) else 0

    def logs() -> str:
        return "".join(p.read_text() for p in tmp_path.glob("*.log"))

    try:
        handler = ["--handler", "orderedstream.testing:record_handler", "--batch", "10"]
        start("c1", "consume", "--name", "c1", *handler)
        start("c2", "consume", "--name", "c2", *handler)
        pid = wait_until(owner_pid, 20, message="an owner under the consumer ACL")
        wait_until(lambda: admin.xpending(STREAM, "workers")["pending"] > 0, 20,
                   message="entries in flight")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: owner_pid() not in (0, pid), 20, message="the standby takes over")
        wait_until(lambda: admin.zcard(keys.delay) + admin.xlen(keys.graveyard) > 0, 20,
                   message="corrupted entries parked")
        start("fixer", "fix", "--name", "f1", role="fixer")
        wait_until(lambda: any(b"os-repaired" in f for _, f in admin.xrange(STREAM)), 20,
                   message="the fixer re-streams under the fixer ACL")
        assert all(p.poll() is None for n, p in procs.items() if p.pid != pid), logs()
        assert "NOPERM" not in logs() and "permission" not in logs().lower(), logs()
        operator = urls["operator"]
        for argv in (["status"], ["status", "--json"], ["dlq", "list"],
                     ["dlq", "list", "--graveyard"], ["dlq", "retry", "--all"],
                     ["dlq", "requeue", "--all"], ["dlq", "purge", "--graveyard", "--all"],
                     ["dlq", "purge", "--all"]):
            out = cli(operator, *argv)
            assert out.returncode in (0, 1) and "error" not in out.stderr, (argv, out.stderr)
        refused = cli(urls["consumer"], "dlq", "purge", "--all")
        assert refused.returncode == 2 and "ACL does not allow" in refused.stderr, refused
        assert "Traceback" not in refused.stderr
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
            p.wait(10)


def test_a_consumer_without_transactions_fences_its_reads_by_script(
        acl_server: ServerProcess) -> None:
    """A consumer whose ACL lacks WATCH / MULTI / EXEC (rules written before the WATCH fence)
    still consumes everything in order: its reads fall back to the deliver script, for this
    term and the next, instead of failing."""
    rules = [r for r in documented_rules()["consumer"]
             if r not in ("+watch", "+unwatch", "+multi", "+exec")]
    admin = acl_server.client()
    rules = [">old-pw" if r.startswith(">") else r for r in rules]
    set_user(admin, "old", rules)
    ids = [admin.xadd(STREAM, {"seq": i}) for i in range(30)]
    seen: list[bytes] = []
    user = redis.Redis(host="127.0.0.1", port=acl_server.port, username="old",
                       password="old-pw")
    config = CoordinatorConfig(stream=STREAM, group="workers", consumer="c1", batch_size=7)
    with Coordinator(config, lambda m: seen.append(m.id.encode()), user) as coordinator:
        wait_until(lambda: len(seen) >= len(ids), 20, message="every entry handled")
        more = [admin.xadd(STREAM, {"seq": 30 + i}) for i in range(5)]
        wait_until(lambda: len(seen) >= len(ids) + len(more), 20, message="new ones too")
    assert coordinator._owner._watched is False  # (recorded at the term's end)
    assert seen == ids + more
    assert admin.xpending(STREAM, "workers")["pending"] == 0
    user.close()


def test_a_consumer_recreates_a_destroyed_group_under_the_documented_acl(
        acl_server: ServerProcess) -> None:
    """The group destroyed under a running consumer (XGROUP DESTROY, a restart that lost it):
    under exactly the README's consumer rules the consumer creates it again after the last
    entry it handed out (XLEN tells it the stream still has entries) and handles the next
    entry; it stopped on a refused XLEN before."""
    rules = [">c-pw" if r.startswith(">") else r for r in documented_rules()["consumer"]]
    admin = acl_server.client()
    set_user(admin, "consumer", rules)
    ids = [admin.xadd(STREAM, {"seq": i}) for i in range(10)]
    seen: list[bytes] = []
    user = redis.Redis(host="127.0.0.1", port=acl_server.port, username="consumer",
                       password="c-pw")
    config = CoordinatorConfig(stream=STREAM, group="workers", consumer="c1")
    with Coordinator(config, lambda m: seen.append(m.id.encode()), user):
        wait_until(lambda: len(seen) == 10, 20, message="every entry handled")
        admin.execute_command("XGROUP", "DESTROY", STREAM, "workers")
        ids.append(admin.xadd(STREAM, {"seq": 10}))
        wait_until(lambda: len(seen) == 11, 20, message="the entry after the group's loss")
    assert seen == ids
    user.close()


TLS_SERVER = "/usr/bin/redis-server"


@pytest.mark.skipif(not Path(TLS_SERVER).exists(), reason=f"{TLS_SERVER} is not installed")
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_rediss_url_works_and_mistakes_are_one_line(tmp_path: Path) -> None:
    """Over TLS (`rediss://...?ssl_ca_certs=ca.crt`): produce, consume and status work; a
    `rediss://` URL without the CA, and `redis://` to the TLS port, fail in one line (exit 2)."""
    tls = make_tls_files(tmp_path)
    tls_port = free_port()
    with ServerProcess(TLS_SERVER, extra_args=["--tls-port", str(tls_port), *tls.server_args()]):
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={tmp_path / 'ca.crt'}"
        client = redis.Redis.from_url(url)
        assert client.ping()
        out = cli(url, "produce", "--count", "5", "--rate", "0")
        assert out.returncode == 0, out.stderr
        out = cli(url, "consume", "--max-messages", "5")
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("seq=") == 5
        out = cli(url, "status", "--json")
        assert out.returncode == 0 and '"stream_length": 5' in out.stdout, out.stderr
        for bad, match in ((f"rediss://127.0.0.1:{tls_port}/0", r"TLS .* failed.*ssl_ca_certs"),
                           (f"redis://127.0.0.1:{tls_port}/0", r"cannot reach|TLS")):
            out = cli(bad, "status", timeout=60)
            assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
            [line] = [x for x in out.stderr.splitlines() if x.startswith("error:")]
            assert re.search(match, line), line
        client.close()
