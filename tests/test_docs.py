"""The README's embedding snippet, the demos and the docker-compose services really run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import redis
import yaml

from orderedstream import Coordinator, GroupKeys
from orderedstream.testing import ServerProcess, wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_readme_embedding_snippet_runs(server: ServerProcess, stream: str) -> None:
    """The README's embedding example starts, owns the group, handles an entry and stops."""
    text = (ROOT / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "Coordinator(" in b)
    # run it up to the "..." (where a service would do its work); the test then stops it
    code = code.replace('"orders"', repr(stream)).split("...\n")[0]
    redis.Redis.from_url(server.url).xadd(stream, {"seq": "1"})
    scope: dict[str, object] = {"REDIS_URL": server.url}
    exec(compile(code, "README.md", "exec"), scope)
    coordinator = scope["coordinator"]
    assert isinstance(coordinator, Coordinator)
    wait_until(lambda: coordinator.handled == 1, 10, message="the entry handled")
    assert coordinator.stop(5)


def test_quickstart_demo_reports_nothing_lost(tmp_path: Path) -> None:
    """demos/quickstart.py (the README's first command) kills the owner and ends with a clean
    verdict (exit code 0 only if nothing was lost or reordered)."""
    out = subprocess.run([sys.executable, str(ROOT / "demos" / "quickstart.py"), "--kills", "2",
                          "--every", "0.5"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "lost 0, out of order 0" in out.stdout
    assert out.stdout.count("failover in") == 2


def test_embed_demo_runs(server: ServerProcess, stream: str) -> None:
    """demos/embed.py stores 100 orders through the epoch-fenced sqlite handler."""
    env = dict(os.environ, REDIS_URL=server.url, ORDEREDSTREAM_STREAM=stream)
    out = subprocess.run([sys.executable, str(ROOT / "demos" / "embed.py")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "stored 100 orders" in out.stdout


def test_compose_services_run(server: ServerProcess, stream: str, tmp_path: Path) -> None:
    """Every application service in docker-compose.yml runs its command with its environment
    (REDIS_URL pointed at the test server): the producer produces and one consumer of the two
    owns the group and handles what was produced while the other waits."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"valkey", "producer", "consumer-1", "consumer-2"}
    assert 'ENTRYPOINT ["orderedstream"]' in (ROOT / "Dockerfile").read_text()
    procs = {}
    try:
        for name in ("consumer-1", "consumer-2", "producer"):
            svc = services[name]
            env = dict(os.environ, **{k: str(v) for k, v in svc["environment"].items()})
            assert env["REDIS_URL"] == "redis://valkey:6379/0"
            env["REDIS_URL"] = server.url
            env["ORDEREDSTREAM_STREAM"] = stream
            env["ORDEREDSTREAM_GROUP"] = "g"
            cmd = [sys.executable, "-m", "orderedstream", *svc["command"]]
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
            procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        client = redis.Redis.from_url(server.url)
        wait_until(lambda: client.xlen(stream) >= 10, 20, message="producer writing")
        wait_until(lambda: any(g["entries-read"] and g["entries-read"] >= 10
                               for g in client.xinfo_groups(stream)), 20,
                   message="a consumer handling")
        assert all(p.poll() is None for p in procs.values())
        owner_pid = int(client.hget(GroupKeys(stream, "g").owner, "pid") or 0)
        consumer_pids = {procs["consumer-1"].pid, procs["consumer-2"].pid}
        assert owner_pid in consumer_pids
        standby = next(n for n in ("consumer-1", "consumer-2") if procs[n].pid != owner_pid)
        wait_until(lambda: "standby" in (tmp_path / f"{standby}.log").read_text(), 10,
                   message=f"{standby} reports it is a standby")
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(10)
    assert "produced" in (tmp_path / "producer.log").read_text()
