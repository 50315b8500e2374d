"""The chaos run (``benchmarks/chaos.py``): its verdict function on made-up histories, and a short
real run without the server restarts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "chaos.py"


def load_chaos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chaos_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


judge = load_chaos().judge

T0 = 1_700_000_000.0  # records' wall clock (s); ids' ms are on the same clock


def sent(seqs: range | list[int], at_ms: int = int(T0 * 1000)) -> dict[int, tuple[int, str]]:
    return {s: (at_ms + s, f"{at_ms + s}-0") for s in seqs}


def rec(seq: int, *, red: bool = False, pid: int = 100, epoch: int = 1, t: float | None = None,
        origin: str | None = None, repaired: bool = False,
        at_ms: int = int(T0 * 1000)) -> dict[str, Any]:
    entry_id = f"{at_ms + seq}-0"
    return {"seq": seq, "id": entry_id, "red": red, "pid": pid, "epoch": epoch,
            "t": t if t is not None else T0 + seq / 1000.0, "repaired": repaired,
            "origin": origin or entry_id}


def test_clean_history_with_a_flagged_replay_and_a_repaired_entry_is_clean() -> None:
    """Handled 1..10 in order, a new owner re-handling 4..5 flagged as redeliveries, and the
    corrupted 10 coming back repaired at the tail: nothing lost, reordered or doubled."""
    records = [rec(s) for s in range(1, 6)]
    records += [rec(4, red=True, pid=200, epoch=2), rec(5, red=True, pid=200, epoch=2)]
    records += [rec(s, pid=200, epoch=2) for s in range(6, 10)]
    records.append(rec(10, pid=200, epoch=2, repaired=True,
                       origin=f"{int(T0 * 1000) + 10}-0"))
    v = judge(sent(range(1, 11)), records, 10, None)
    assert (v["lost"], v["out_of_order"], v["unflagged_duplicates"]) == (0, 0, 0)
    assert v["duplicates"] == 2
    assert v["repaired_handled"] == 1
    assert (v["epochs_backwards"], v["owner_terms"]) == (0, 2)


def test_a_lost_entry_a_skip_and_an_unflagged_duplicate_are_each_counted() -> None:
    """Seq 3 never handled is lost (and 4 after 2 skipped ahead); 2 handled again without
    the redelivered flag is an unflagged duplicate."""
    records = [rec(1), rec(2), rec(4), rec(2), rec(5)]
    v = judge(sent(range(1, 6)), records, 0, None)
    assert v["lost"] == 1 and v["lost_seqs"] == [3]
    assert v["unflagged_duplicates"] == 1
    assert 4 in v["out_of_order_seqs"]


def test_a_zombie_write_is_fenced_and_left_out() -> None:
    """A paused owner (epoch 1) writing once after the new owner (epoch 2) took over: a
    fenced store refuses it, and it does not count as an unflagged duplicate."""
    records = [rec(1), rec(2), rec(2, red=True, pid=200, epoch=2), rec(3, pid=200, epoch=2),
               rec(2, pid=100, epoch=1), rec(4, pid=200, epoch=2)]
    v = judge(sent(range(1, 5)), records, 0, None)
    assert v["zombie_writes_fenced"] == 1 and v["zombie_writes_accepted"] == 0
    assert (v["lost"], v["out_of_order"], v["unflagged_duplicates"]) == (0, 0, 0)


def test_data_loss_restart_splits_the_losses_and_sees_epochs_going_back() -> None:
    """Entries acknowledged before the wipe and never handled are lost with the server's data;
    after it, a new owner with epoch 1 (below 7) went backwards and a fenced store refuses its
    writes; an entry acknowledged after the wipe and never handled is lost."""
    before = int(T0 * 1000)
    wipe_ms = before + 100
    after = before + 1000
    acked = sent(range(1, 6), before)
    acked.update({s: (after + s, f"{after + s}-0") for s in range(6, 10)})
    records = [rec(1, epoch=7), rec(2, epoch=7)]
    records += [rec(s, pid=300, epoch=1, t=(after + s) / 1000.0, at_ms=after) for s in (6, 7, 8)]
    v = judge(acked, records, 0, wipe_ms)
    assert v["lost_with_server_data"] == 3  # 3, 4, 5
    assert v["lost"] == 1 and v["lost_seqs"] == [9]
    assert v["out_of_order"] == 0
    assert v["epochs_backwards"] == 1
    assert v["writes_refused_by_fenced_store"] == 3


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_short_chaos_run_without_server_restarts_is_clean_and_leaves_nothing_behind() -> None:
    """12 s at 200 entries/s with owner kills, pauses, CLIENT KILLs and fixer kills (no server
    restarts): nothing lost, reordered or doubled without a flag, no process died by itself,
    and every process and server the run started is gone, its work directory too."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--duration", "12", "--rate", "200", "--seed", "3",
         "--fault-every", "1.0", "--no-server-restarts", "--drain-timeout", "15", "--json"],
        capture_output=True, text=True, timeout=80)
    assert proc.stdout, proc.stderr
    result = json.loads(proc.stdout)
    counts = result["fault_counts"]
    assert sum(counts.get(k, 0) for k in ("kill", "pause", "clientkill", "killfixer")) >= 5
    assert "server-aof" not in counts and "server-wipe" not in counts
    v = result["verdict"]
    assert v["produced"] > 1500
    assert result["ok"], json.dumps({"failures": result["failures"], "verdict": v,
                                     "died": result["died_by_itself"]}, indent=1)
    assert proc.returncode == 0
    for pid in result["pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not Path(result["workdir"]).exists()
