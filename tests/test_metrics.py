"""Prometheus metrics: the hook's series on a real server, failovers counted once by reason, a
live consumer's ``/metrics`` scraped over HTTP, and the Grafana dashboard and compose profile
checked against the exporter's series."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from orderedstream import (
    Coordinator,
    CoordinatorConfig,
    Defer,
    GroupKeys,
    LeaseConfig,
    Message,
    Producer,
)
from orderedstream.testing import free_port, read_records, wait_until

from .conftest import Consumers

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from orderedstream.metrics import SERIES, PrometheusHook  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)  # type: ignore[no-any-return]


def coordinator(client: redis.Redis, stream: str, name: str, hook: PrometheusHook,
                handler: Any = None, ttl_ms: int = 1000) -> Coordinator:
    config = CoordinatorConfig(stream=stream, group="g", consumer=name,
                               lease=LeaseConfig(ttl_ms=ttl_ms))
    return Coordinator(config, handler or (lambda m: None), client, hooks=[hook])


def test_series_from_a_running_coordinator(client: redis.Redis, stream: str) -> None:
    """Handled entries by outcome (a Defer counts as parked, not ok), the handler histogram of a
    timed handler, and the group gauges read from the server: owner, epoch, parked, lag."""
    Producer(client, stream).send_many({"seq": s} for s in range(50))
    registry = CollectorRegistry()
    hook = PrometheusHook(registry, client=client, min_interval_s=0)

    def handler(message: Message) -> None:
        if message.fields["seq"] == "7":
            raise Defer("later", delay_ms=60_000)

    c = coordinator(client, stream, "a", hook, hook.timed(handler))
    c.start()
    try:
        wait_until(lambda: c.handled >= 50, 10, message="50 handled")
        labels = {"stream": stream, "group": "g", "consumer": "a"}
        wait_until(lambda: value(registry, "orderedstream_handled_total",
                                 outcome="ok", **labels) == 49, 5, message="49 ok")
        assert value(registry, "orderedstream_handled_total", outcome="parked", **labels) == 1
        assert value(registry, "orderedstream_handler_duration_seconds_count", **labels) == 50
        assert value(registry, "orderedstream_lease_acquisitions_total", **labels) == 1
        assert value(registry, "orderedstream_is_owner", **labels) == 1
        group = {"stream": stream, "group": "g"}
        assert value(registry, "orderedstream_owner_info", consumer="a", **group) == 1
        assert value(registry, "orderedstream_epoch", **group) == c.epoch
        assert value(registry, "orderedstream_parked_entries", **group) == 1
        assert value(registry, "orderedstream_lag_entries", **group) == 0
        assert value(registry, "orderedstream_stream_entries", **group) == 50
        for reason in ("crash", "graceful", "stalled", "ttl", "unknown"):
            assert value(registry, "orderedstream_failovers_total", reason=reason,
                         **labels) == 0
    finally:
        c.stop(5)


def test_graceful_and_ttl_failovers_by_reason(client: redis.Redis, stream: str) -> None:
    """A standby that takes over after a clean stop counts one 'graceful' failover; one that
    takes over a term whose lease simply ran out (an owner that never renews and whose
    connection cannot be watched) counts one 'ttl'; a consumer that finds the lease free
    counts none."""
    registry = CollectorRegistry()
    hook = PrometheusHook(registry, client=client, min_interval_s=0)
    a = coordinator(client, stream, "a", hook)
    a.start()
    wait_until(lambda: a.epoch, 5, message="a owns")
    b = coordinator(client, stream, "b", hook)
    b.start()
    try:
        wait_until(lambda: b.role.value == "standby", 5, message="b waits")
        a.stop(5)
        wait_until(lambda: b.epoch, 5, message="b owns")
        b.stop(5)
        # a term nobody renews: a lease set by hand, with no heartbeat connection to watch
        keys = GroupKeys(stream, "g")
        client.set(keys.lease, "ghost:5:abc", px=300)
        c = coordinator(client, stream, "c", hook)
        c.start()
        wait_until(lambda: c.epoch, 5, message="c owns after the ghost's TTL")
        c.stop(5)
    finally:
        a.stop(5)
        b.stop(5)

    def failovers(consumer: str) -> dict[str, float | None]:
        return {r: value(registry, "orderedstream_failovers_total", stream=stream, group="g",
                         consumer=consumer, reason=r) for r in ("crash", "graceful", "ttl")}

    assert failovers("a") == {"crash": 0, "graceful": 0, "ttl": 0}
    assert failovers("b") == {"crash": 0, "graceful": 1, "ttl": 0}
    assert failovers("c") == {"crash": 0, "graceful": 0, "ttl": 1}


def test_one_hook_per_registry() -> None:
    """A second hook on one registry is refused (its series would collide)."""
    registry = CollectorRegistry()
    PrometheusHook(registry)
    with pytest.raises(ValueError, match="Duplicated"):
        PrometheusHook(registry)


def scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], family: str, name: str, **labels: str) -> float | None:
    for s in families[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return None


@pytest.mark.slow
def test_live_consumer_metrics_over_http(client: redis.Redis, stream: str,
                                         consumers: Consumers) -> None:
    """``consume --metrics-port``: a standby's /metrics carries every series the exporter
    defines, with its declared type; after the owner is SIGKILLed and the standby takes over,
    exactly one failover shows up, with reason 'crash', and stays one."""
    Producer(client, stream).send_many({"seq": s} for s in range(1, 201))
    a = consumers.start("a", ttl_ms=2000)
    wait_until(lambda: client.hget(GroupKeys(stream, "g").owner, "consumer") == b"a", 10,
               message="a owns")
    port = free_port()
    b = consumers.start("b", ttl_ms=2000, extra=("--metrics-port", f"127.0.0.1:{port}"))

    def standby_scrape() -> dict[str, Any] | None:
        try:
            families = scrape(port)
        except OSError:
            return None
        return families if sample(families, "orderedstream_is_owner",
                                  "orderedstream_is_owner", consumer="b") == 0 else None

    families = wait_until(standby_scrape, 15, 0.1, message="b's /metrics, as a standby")
    kinds = {f.name: f.type for f in families.values()}
    for name, kind, _ in SERIES:
        family = name[:-len("_total")] if name.endswith("_total") else name
        assert kinds.get(family) == kind, (name, kinds.get(family))
    assert sample(families, "orderedstream_owner_info", "orderedstream_owner_info",
                  consumer="a") == 1
    a.send_signal(signal.SIGKILL)
    a.wait(10)

    def failovers() -> dict[str, float | None]:
        fams = scrape(port)
        return {r: sample(fams, "orderedstream_failovers", "orderedstream_failovers_total",
                          consumer="b", reason=r)
                for r in ("crash", "graceful", "stalled", "ttl", "unknown")}

    wait_until(lambda: failovers()["crash"] == 1, 15, 0.1, message="one crash failover")
    Producer(client, stream).send_many({"seq": s} for s in range(201, 221))

    def handled_by_b() -> bool:
        records = read_records(consumers.record)
        seqs = {int(r["seq"]) for r in records}
        by_b = sum(1 for r in records if r["pid"] == b.pid)
        ok = sample(scrape(port), "orderedstream_handled", "orderedstream_handled_total",
                    consumer="b", outcome="ok")
        return len(seqs) == 220 and ok == by_b

    wait_until(handled_by_b, 15, 0.1, message="b handled the rest, each counted once")
    assert failovers() == {"crash": 1, "graceful": 0, "stalled": 0, "ttl": 0, "unknown": 0}
    wait_until(lambda: sample(scrape(port), "orderedstream_owner_info",
                              "orderedstream_owner_info", consumer="b") == 1, 5, 0.2,
               message="owner_info names b (group gauges are read at most once a second)")
    assert sample(scrape(port), "orderedstream_takeover_duration_seconds",
                  "orderedstream_takeover_duration_seconds_count", consumer="b") == 1


def readme_snippet(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b)


def test_readme_metrics_snippet_runs(server: Any, stream: str,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The README's Prometheus snippet runs as pasted (REDIS_URL set) and prints series."""
    monkeypatch.setenv("REDIS_URL", server.url)
    code = readme_snippet("PrometheusHook(").replace('"orders"', repr(stream))
    exec(compile(code, "README.md", "exec"), {})
    assert "orderedstream_" in capsys.readouterr().out


# -- the dashboard and the compose profile ------------------------------------------------

GRAFANA = ROOT / "demos" / "grafana"


def exported_names() -> set[str]:
    names = set()
    for name, kind, _ in SERIES:
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def test_dashboard_queries_use_exported_series_only() -> None:
    """Every metric name in the dashboard's queries is one the exporter defines, and the key
    series (failovers, takeover time, epoch, owner, lag) each have a panel."""
    dashboard = json.loads((GRAFANA / "dashboards" / "orderedstream.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    used = set()
    for expr in exprs:
        used |= set(re.findall(r"\borderedstream_[a-z_]+", expr))
    unknown = used - exported_names()
    assert not unknown, unknown
    for needed in ("orderedstream_failovers_total",
                   "orderedstream_takeover_duration_seconds_bucket", "orderedstream_epoch",
                   "orderedstream_owner_info", "orderedstream_lag_entries",
                   "orderedstream_oldest_pending_age_seconds", "orderedstream_parked_entries",
                   "orderedstream_graveyard_entries", "orderedstream_handled_total"):
        assert needed in used, needed


def test_compose_metrics_profile() -> None:
    """docker-compose.yml parses; the 'metrics' profile has Prometheus and Grafana with the
    provisioning mounted, and Prometheus scrapes the services that export /metrics."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    profiled = {n for n, s in services.items() if "metrics" in s.get("profiles", [])}
    assert profiled == {"prometheus", "grafana"}
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), source
    scrape_config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    targets = [t for job in scrape_config["scrape_configs"]
               for sc in job["static_configs"] for t in sc["targets"]]
    for target in targets:
        host, port = target.split(":")
        env = services[host].get("environment", {})
        assert env.get("ORDEREDSTREAM_METRICS_PORT") == port, (host, env)
    assert {"consumer-1", "consumer-2", "fixer"} <= {t.split(":")[0] for t in targets}
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


def test_fixer_serves_metrics(server: Any, stream: str,
                              procs: list[subprocess.Popen[bytes]]) -> None:
    """``fix --metrics-port`` serves the group gauges of its (stream, group) before it has
    anything to do (the dead-letter counts an operator alerts on)."""
    port = free_port()
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "orderedstream", "fix", "--redis-url", server.url, "--stream",
         stream, "--group", "g", "--quiet", "--metrics-port", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def parked() -> float | None:
        try:
            return sample(scrape(port), "orderedstream_parked_entries",
                          "orderedstream_parked_entries", stream=stream, group="g")
        except OSError:
            return None

    wait_until(lambda: parked() is not None, 15, 0.1, message="the fixer's /metrics")
    assert parked() == 0
