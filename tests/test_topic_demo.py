"""`orderedstream demo --partitions`: the partitioned demo as a user runs it (a subprocess that
starts its own cluster, members, producer), its verdict, and nothing left running after it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orderedstream.cli.topic_demo import judge
from orderedstream.testing import wait_until


def _running_with(text: str) -> list[int]:
    """Pids of processes whose command line mentions ``text``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and proc.name != str(os.getpid()):
            pids.append(int(proc.name))
    return pids


def _port_closed(url: str) -> bool:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _check_clean(result: dict[str, Any], least: int = 300) -> None:
    assert result["ok"], result
    assert result["lost"] == 0 and result["out_of_order"] == 0, result
    assert result["unflagged_duplicates"] == 0 and result["epochs_reused"] == 0, result
    assert result["produced"] > least and result["handled"] >= result["produced"], result
    # every corrupted entry (1 in 50 by default) repaired by the topic fixers, in its key's
    # order (out_of_order above), and nothing left on the dead-letter path
    assert result["repaired"] == result["corrupted"] > 0, result
    assert result["still_parked"] == 0 and result["buried"] == 0, result
    # everything the demo started is gone: members and producer (they name the topic), and
    # the cluster's nodes (the URL's port answers no more)
    assert _running_with(f"--topic {result['topic']}") == []
    assert _port_closed(result["server"])


def _demo(*args: str, stderr: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "orderedstream", "demo", "--json", *args],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def test_topic_demo_short_run_verdict_is_clean() -> None:
    """`demo --partitions 4` for a few seconds with a member killed every 2 s and a fixer
    once: exit 0, a verdict with nothing lost, per-key order kept (repaired entries in their
    place: hold-key mode), every corrupted entry repaired, nothing left parked, no unflagged
    duplicate, no epoch reused, a timed failover per kill; every process it started gone."""
    demo = _demo("--partitions", "4", "--duration", "7", "--kill-every", "2", "--rate", "150")
    stdout, stderr = demo.communicate(timeout=150)
    assert demo.returncode == 0, stdout + stderr[-3000:]
    result = json.loads(stdout)
    _check_clean(result)
    assert result["partitions"] == 4 and result["kills"] >= 2, result
    assert len(result["failovers_ms"]) == result["kills"] - result["failovers_not_seen"] >= 1
    assert not result["interrupted"] and not result["primary_killed"]
    assert result["fixers"] == 2 and result["fixer_kills"] == 1, result


def test_topic_demo_ctrl_c_ends_with_a_verdict_and_stops_everything(tmp_path: Path) -> None:
    """Ctrl+C (SIGINT) in the middle of a long run: the kills stop, the members drain, the
    verdict is printed (clean, marked interrupted), exit 0, and nothing it started is left."""
    err = tmp_path / "stderr.txt"
    with err.open("w") as sink:
        demo = _demo("--partitions", "4", "--duration", "120", "--kill-every", "1.5",
                     "--rate", "150", "--consumers", "3", "--keep-logs", stderr=sink)
    try:
        wait_until(lambda: "Ctrl+C" in err.read_text(), 60, 0.1, message="the first line")
        text = " ".join(err.read_text().split())  # (the console wraps it)
        logs = Path(text.split("logs in ", 1)[1].split(";", 1)[0].replace(" ", ""))
        # a fifth member log: two members were killed and replaced
        wait_until(lambda: (logs / "member-5.log").exists(), 60, 0.1, message="two kills")
        demo.send_signal(signal.SIGINT)
        stdout, _ = demo.communicate(timeout=90)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, stdout + err.read_text()[-3000:]
    result = json.loads(stdout)
    assert result["interrupted"] and result["kills"] >= 2, result
    _check_clean(result, least=100)
    assert result["logs"] == str(logs)
    shutil.rmtree(logs, ignore_errors=True)


@pytest.mark.slow
def test_topic_demo_kill_primary_verdict_is_clean() -> None:
    """`demo --partitions 8 --kill-primary`: members killed and one primary killed mid-run
    (its replica promoted); the verdict is still clean (no epoch handed out twice across the
    promotion), and the primary's failover is timed."""
    demo = _demo("--partitions", "8", "--duration", "16", "--kill-every", "3",
                 "--kill-primary")
    stdout, stderr = demo.communicate(timeout=240)
    assert demo.returncode == 0, stdout + stderr[-3000:]
    result = json.loads(stdout)
    _check_clean(result)
    assert result["primary_killed"] and result["primary_failover_ms"] is not None, result
    assert 500 < result["primary_failover_ms"] < 15_000, result  # node timeout is 1 s


def test_topic_demo_verdict_counts_server_losses_apart() -> None:
    """The verdict's arithmetic: an entry the streams no longer hold and nobody handled (taken
    by a killed primary) is 'lost by the server', not lost by orderedstream, and the gap it
    leaves in its key's sequence is not a reordering; an entry the stream holds and nobody
    handled is lost; a key's entries handled out of order are counted."""
    def rec(seq: int, key: str, kseq: int, red: bool = False) -> dict[str, Any]:
        return {"seq": seq, "key": key, "kseq": kseq, "red": red, "p": 0, "epoch": 1,
                "pid": 1}

    present = {1: ("a", 1), 3: ("a", 3), 4: ("b", 1), 5: ("b", 2)}  # seq 2 ("a", 2) gone
    clean = judge([rec(1, "a", 1), rec(3, "a", 3), rec(4, "b", 1), rec(5, "b", 2)], present)
    assert clean["ok"] and clean["lost"] == 0 and clean["lost_by_server"] == 1, clean
    assert clean["out_of_order"] == 0
    lost = judge([rec(1, "a", 1), rec(3, "a", 3), rec(4, "b", 1)], present)
    assert not lost["ok"] and lost["lost"] == 1, lost
    swapped = judge([rec(1, "a", 1), rec(3, "a", 3), rec(5, "b", 2), rec(4, "b", 1)], present)
    assert not swapped["ok"] and swapped["out_of_order"] >= 1, swapped


def test_topic_demo_verdict_counts_repaired_entries_once() -> None:
    """The verdict's arithmetic for the dead-letter path: a repaired entry handled twice (a
    flagged redelivery after a kill) counts once; a corrupted entry never handled repaired,
    or one still parked or buried, makes the verdict fail; a repaired entry is judged in its
    key's place (hold-key mode), so one handled after its key's later entries is a
    reordering."""
    def rec(seq: int, kseq: int, red: bool = False, repaired: bool = False) -> dict[str, Any]:
        return {"seq": seq, "key": "a", "kseq": kseq, "red": red, "p": 0, "epoch": 1,
                "pid": 1, "repaired": repaired}

    present = {1: ("a", 1), 2: ("a", 2), 3: ("a", 3)}
    held = [rec(1, 1), rec(2, 2, repaired=True), rec(2, 2, red=True, repaired=True), rec(3, 3)]
    clean = judge(held, present, {2})
    assert clean["ok"] and clean["repaired"] == 1 == clean["corrupted"], clean
    assert not judge(held, present, {2}, parked=1)["ok"]
    assert not judge(held, present, {2}, buried=1)["ok"]
    unrepaired = judge([rec(1, 1), rec(2, 2), rec(3, 3)], present, {2})
    assert not unrepaired["ok"] and unrepaired["repaired"] == 0, unrepaired
    late = judge([rec(1, 1), rec(3, 3), rec(2, 2, repaired=True)], present, {2})
    assert not late["ok"] and late["out_of_order"] >= 1, late
