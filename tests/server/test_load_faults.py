"""The load-with-faults script (benchmarks/load_faults.py) at CI size: a real server, concurrent streaming and
non-streaming clients with random diffusion options, a third leaving mid-request; every completed request equals
the offline LLM's answer, gauges and KV usage return to 0, RSS stays within 10% of round 1, SIGTERM exits 0.
The full run (200 clients x 5 rounds) is recorded in benchmarks/results/load_faults.md."""
from __future__ import annotations

import json

import pytest

from benchmarks import load_faults


@pytest.mark.slow
def test_load_with_faults_small(tmp_path):
    out = tmp_path / "load.md"
    code = load_faults.main(["--clients", "24", "--rounds", "2", "--specs", "10", "--seed", "3",
                             "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert code == 0, json.dumps(report, indent=1)
    assert report["passed"] and report["exit_code"] == 0
    rounds = report["rounds"]
    assert len(rounds) == 2 and all(r["failed"] == 0 and r["gauges_zero"] for r in rounds)
    assert sum(r["abandoned"] for r in rounds) > 0 and sum(r["completed"] for r in rounds) > 0
    assert "PASS" in out.read_text()
