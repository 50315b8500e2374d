"""The README's snippets (as pasted), its command lines, the demos and the docker-compose
services really run."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import yaml

from orderedstream import Coordinator, GroupKeys
from orderedstream.testing import ServerProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)


def test_readme_python_snippets_run_as_pasted(server: ServerProcess) -> None:
    """Every ```python block of the README, pasted into `python` with only REDIS_URL set,
    runs and exits 0 (imports, names and calls as written)."""
    blocks = _blocks(ROOT / "README.md", "python")
    assert len(blocks) >= 2
    for code in blocks:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, REDIS_URL=server.url))
        assert out.returncode == 0, f"{code}\n{out.stderr[-2000:]}"
    client = redis.Redis.from_url(server.url)  # the snippets' own keys: gone
    client.delete("orders", *GroupKeys("orders", "billing").all())
    client.close()


def test_documented_command_lines_parse() -> None:
    """Every `orderedstream ...` line in the READMEs' bash blocks is a command line the CLI
    accepts (options spelled right, values of the right type)."""
    from orderedstream.cli import build_parser

    parser = build_parser()
    seen = 0
    for doc in (ROOT / "README.md", ROOT / "demos" / "README.md"):
        for block in _blocks(doc, "bash"):
            for line in block.splitlines():
                line = line.split("#", 1)[0].strip()
                if not line.startswith("orderedstream "):
                    continue
                argv = [t.strip("[]") for t in shlex.split(line)[1:]]
                argv = ["1-1" if t.startswith("<") else t for t in argv]
                try:
                    parser.parse_args(argv)
                except SystemExit as err:
                    raise AssertionError(f"{doc.name}: {line!r} does not parse") from err
                seen += 1
    assert seen >= 15


def test_readme_embedding_snippet_runs(server: ServerProcess, stream: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's embedding example starts, owns the group, handles an entry and stops."""
    code = next(b for b in _blocks(ROOT / "README.md", "python") if "Coordinator(" in b)
    # run it up to the "..." (where a service would do its work); the test then stops it
    code = code.replace('"orders"', repr(stream)).split("...\n")[0]
    redis.Redis.from_url(server.url).xadd(stream, {"seq": "1"})
    monkeypatch.setenv("REDIS_URL", server.url)
    scope: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), scope)
    coordinator = scope["coordinator"]
    assert isinstance(coordinator, Coordinator)
    wait_until(lambda: coordinator.handled == 1, 10, message="the entry handled")
    assert coordinator.stop(5)


def test_demo_kills_and_pauses_lose_nothing() -> None:
    """`orderedstream demo` (the README's first command) on the embedded server, short: owners
    killed, then paused; its JSON verdict (from the handlers' record) shows nothing lost or out
    of order, every corrupted payload handled once repaired, and measured failovers."""
    for extra in ([], ["--pause"]):
        out = subprocess.run(
            [sys.executable, "-m", "orderedstream", "demo", "--duration", "7", "--kill-every",
             "2", "--rate", "150", "--corrupt-every", "20", "--json", *extra],
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr[-3000:]
        result = json.loads(out.stdout)
        assert result["lost"] == 0 and result["out_of_order"] == 0, result
        assert result["unflagged_duplicates"] == 0
        assert result["produced"] > 500
        assert result["repaired_handled"] == result["corrupted"] > 0
        assert len(result["failovers_ms"]) >= 2
        if extra:  # a paused owner is noticed only when its lease (1.5 s) runs out
            assert all(1000 < ms < 5000 for ms in result["failovers_ms"]), result
        else:  # a killed one at once (connection watch)
            assert result["failover_ms_p50"] < 500, result


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_demo_renders_owner_and_failover_in_a_terminal(tmp_path: Path) -> None:
    """`orderedstream demo` in a real 80x24 terminal (tmux): the screen shows the owner with
    its epoch, failover rows with how long each took, newest first, and after several
    failovers the current owner's acquisition in the timeline (the failover just caused is
    never cut off)."""
    session = f"osdemo{os.getpid()}"
    cmd = (f"{sys.executable} -m orderedstream demo --duration 14 --kill-every 2 "
           f"--rate 100; sleep 30")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", cmd],
                   check=True, env=dict(os.environ, TERM="xterm-256color"))
    screens: list[str] = []

    def screen() -> str:
        text = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                              capture_output=True, text=True).stdout
        screens.append(text)
        return text

    try:
        wait_until(lambda: re.search(r"owner consumer-\d+\s+epoch \d+", screen()) is not None,
                   30, message="the owner on screen")
        wait_until(lambda: re.search(r"consumer-\d+ \(killed\).*consumer-\d+.*\d+ ms",
                                     screen()) is not None, 30,
                   message="a failover row with its duration")

        def newest_on_screen() -> bool:
            text = screen()
            head = re.search(r"owner (consumer-\d+)\s+epoch (\d+)", text)
            kills = len(re.findall(r"\(killed\)", text))
            return (head is not None and kills >= 3
                    and re.search(rf"acquired\s+{head.group(1)}\s+{head.group(2)}", text)
                    is not None)

        wait_until(newest_on_screen, 30, 0.2,
                   message="three failovers, and the current owner's acquisition on screen")
        wait_until(lambda: "verdict (from" in screen(), 60, message="the verdict")
        assert re.search(r"│ lost\s+│ 0\s+│", screens[-1]), screens[-1]
        assert re.search(r"│ out of order\s+│ 0\s+│", screens[-1]), screens[-1]
    finally:
        (tmp_path / "screen.txt").write_text(screens[-1] if screens else "")
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


def test_embed_demo_runs(server: ServerProcess, stream: str) -> None:
    """demos/embed.py stores 100 orders through the epoch-fenced sqlite handler."""
    env = dict(os.environ, REDIS_URL=server.url, ORDEREDSTREAM_STREAM=stream)
    out = subprocess.run([sys.executable, str(ROOT / "demos" / "embed.py")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "stored 100 orders" in out.stdout


def test_compose_services_run(server: ServerProcess, stream: str, tmp_path: Path) -> None:
    """Every application service in docker-compose.yml runs its command with its environment
    (REDIS_URL pointed at the test server): the producer produces, one consumer of the two
    owns the group and handles what was produced while the other waits, and the fixer repairs
    the corrupted payloads, which the owner then handles."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {n for n, svc in services.items() if "profiles" not in svc} == {
        "valkey", "producer", "consumer-1", "consumer-2", "fixer"}
    assert 'ENTRYPOINT ["orderedstream"]' in (ROOT / "Dockerfile").read_text()
    # consumer-2 waits for consumer-1 to be healthy, and healthy means: it owns the group
    assert services["consumer-2"]["depends_on"]["consumer-1"] == {"condition": "service_healthy"}
    health = services["consumer-1"]["healthcheck"]["test"]
    assert health[0] == "CMD" and health[1] == "orderedstream"
    procs = {}

    def env_of(name: str) -> dict[str, str]:
        env = dict(os.environ, **{k: str(v) for k, v in services[name]["environment"].items()})
        assert env["REDIS_URL"] == "redis://valkey:6379/0"
        env["REDIS_URL"] = server.url
        env["ORDEREDSTREAM_STREAM"] = stream
        env["ORDEREDSTREAM_GROUP"] = "g"
        if "ORDEREDSTREAM_METRICS_PORT" in env:  # one host here, not one per container
            env["ORDEREDSTREAM_METRICS_PORT"] = f"127.0.0.1:{free_port()}"
        return env

    def healthy() -> bool:
        out = subprocess.run([sys.executable, "-m", *health[1:]], env=env_of("consumer-1"),
                             capture_output=True, timeout=30)
        return out.returncode == 0

    try:
        for name in ("consumer-1", "consumer-2", "fixer", "producer"):
            if name == "consumer-2":
                wait_until(healthy, 30, 0.2, message="consumer-1 healthy (it owns)")
            cmd = [sys.executable, "-m", "orderedstream", *services[name]["command"]]
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
            procs[name] = subprocess.Popen(cmd, env=env_of(name), stdout=log, stderr=log)
        client = redis.Redis.from_url(server.url)
        wait_until(lambda: client.xlen(stream) >= 10, 20, message="producer writing")
        wait_until(lambda: any(g["entries-read"] and g["entries-read"] >= 10
                               for g in client.xinfo_groups(stream)), 20,
                   message="a consumer handling")
        assert all(p.poll() is None for p in procs.values())
        owner_pid = int(client.hget(GroupKeys(stream, "g").owner, "pid") or 0)
        assert owner_pid == procs["consumer-1"].pid  # `docker compose kill consumer-1` hits it
        standby = "consumer-2"
        wait_until(lambda: "standby" in (tmp_path / f"{standby}.log").read_text(), 10,
                   message=f"{standby} reports it is a standby")
        # the producer corrupts every 25th payload: parked, repaired by the fixer, re-streamed
        wait_until(lambda: any(b"os-repaired" in f for _, f in client.xrange(stream)), 20,
                   message="a corrupted payload re-streamed repaired by the fixer")
        wait_until(lambda: "repaired from" in (tmp_path / "consumer-1.log").read_text()
                   + (tmp_path / "consumer-2.log").read_text(), 10,
                   message="the owner handled the repaired entry")
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(10)
    assert "produced" in (tmp_path / "producer.log").read_text()


@pytest.mark.parametrize("demo", ["service.py", "async_service.py"])
def test_service_demo_health_and_graceful_sigterm(server: ServerProcess, stream: str,
                                                  tmp_path: Path, demo: str) -> None:
    """demos/service.py and its asyncio twin demos/async_service.py: /health reports the owner,
    SIGTERM hands the lease to the standby at once (long before the 3 s TTL), and the process
    exits 0."""
    import urllib.request

    env = dict(os.environ, REDIS_URL=server.url, ORDEREDSTREAM_STREAM=stream,
               ORDEREDSTREAM_GROUP="g")
    procs = []

    def start(name: str) -> tuple[subprocess.Popen[str], str]:
        p = subprocess.Popen([sys.executable, str(ROOT / "demos" / demo), "--name",
                              name, "--port", "0"], env=env, stdout=subprocess.PIPE,
                             stderr=open(tmp_path / f"{name}.log", "w"), text=True)  # noqa: SIM115
        procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        return p, line.split()[-1]

    def health(url: str) -> dict[str, object]:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.loads(reply.read())  # type: ignore[no-any-return]

    try:
        one, url_one = start("svc-1")
        wait_until(lambda: health(url_one)["role"] == "owner", 10, message="svc-1 owns")
        _, url_two = start("svc-2")
        wait_until(lambda: health(url_two)["role"] == "standby", 10, message="svc-2 waits")
        redis.Redis.from_url(server.url).xadd(stream, {"seq": "1"})
        wait_until(lambda: health(url_one)["handled"] == 1, 10, message="svc-1 handled it")
        one.send_signal(15)
        assert one.wait(10) == 0
        wait_until(lambda: health(url_two)["role"] == "owner", 1.0,
                   message="svc-2 owns within 1 s of the SIGTERM (TTL is 3 s)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)


def test_readme_fixer_snippet_repairs(server: ServerProcess, stream: str) -> None:
    """The README's fixer example repairs a parked entry (payload stripped) and re-streams it."""
    from orderedstream import ParkedEntry

    text = (ROOT / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "Fixer(" in b)
    client = redis.Redis.from_url(server.url)
    keys = GroupKeys(stream, "billing")
    client.xgroup_create(stream, "billing", id="$", mkstream=True)
    record = ParkedEntry(id="1-1", origin_id="1-1", group="billing", reason="padded",
                         raw={b"payload": b"  order-1  "})
    client.hset(keys.parked, "1-1", record.to_json())
    client.zadd(keys.delay, {"1-1": 0})

    def work() -> None:
        wait_until(lambda: client.xlen(stream) == 1, 10, message="re-streamed")

    code = code.replace('"orders"', repr(stream)).replace("    ...", "    work()")
    os.environ["REDIS_URL"] = server.url  # as a user would have it set
    try:
        exec(compile(code, "README.md", "exec"), {"work": work})
    finally:
        del os.environ["REDIS_URL"]
    [(_, fields)] = client.xrange(stream)
    assert fields[b"payload"] == b"order-1" and fields[b"os-origin-id"] == b"1-1"


def test_demo_verdict_refuses_a_woken_zombies_write_like_an_epoch_fenced_store() -> None:
    """The demo judges the record as an epoch-fencing store would: a write with an epoch older
    than one already written (a paused owner finishing its last call) is refused and counted."""
    from orderedstream.cli.demo import fence

    written = [{"seq": 1, "epoch": 1}, {"seq": 2, "epoch": 1}, {"seq": 2, "epoch": 2},
               {"seq": 2, "epoch": 1}, {"seq": 3, "epoch": 2}]
    accepted, refused = fence(written)
    assert [(r["seq"], r["epoch"]) for r in accepted] == [(1, 1), (2, 1), (2, 2), (3, 2)]
    assert refused == 1
