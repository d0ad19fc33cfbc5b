"""Worker crash: kill -9 an ACS actor's process mid-run; Ray restarts it, the job finishes, and
every query appears exactly once with no `model_error` rows.

The process to kill is found by pid in the actor table of the test session's own cluster (this
driver's job, class `MapWorker(MapBatches(ACSStage))`), never by its command line: a search of
the machine's processes by name would also kill the actor of any other `acs label` running beside
the suite. A decoy whose command line names the actor class checks that it is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest

from _label_helpers import K, PARROT_TOKENS, assert_exactly_once, label_config, markers, read

ACS_ACTOR = "MapWorker(MapBatches(ACSStage))"


def acs_actor_pids(ray) -> dict[str, int]:
    """actor id -> pid of this driver's job's live ACS actors, from the connected cluster's GCS
    actor table. (The public state API, `ray.util.state`, needs the dashboard, which the test
    session's instance runs without.)"""
    from ray._private import state

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    return {aid: a["Pid"] for aid, a in state.actors(job_id=job).items()
            if a["ActorClassName"] == ACS_ACTOR and a["State"] == "ALIVE" and a["Pid"]}


@pytest.mark.slow
def test_actor_killed_mid_run(ray_session, synthetic6, parrot_model_dir, tmp_path):
    from ray._private import state

    from pipeline.label import run_label

    out = tmp_path / "out"
    killed: dict[str, int] = {}
    kill_time: list[float] = []
    stop = threading.Event()
    # Another run's actor, as a machine-wide search by command line would see it.
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", f"ray::{ACS_ACTOR}.submit"])

    def killer():
        # Kill the actor as soon as the first shard is finished: the others are still to come.
        deadline = time.time() + 120
        while not stop.is_set() and time.time() < deadline:
            if (out / "_shards").exists():
                pids = acs_actor_pids(ray_session)
                for aid, pid in pids.items():
                    os.kill(pid, signal.SIGKILL)
                    killed[aid] = pid
                if pids:
                    kill_time.append(time.time())
                    return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        cfg = label_config(output=str(out), coco=synthetic6["ann"], images=synthetic6["root"],
                           model=str(parrot_model_dir), max_new_tokens=PARROT_TOKENS, batch_size=1, shard_size=3)
        summary = run_label(cfg)
        stop.set()
        t.join(5)
        assert decoy.poll() is None, "a process outside the cluster was killed"
    finally:
        decoy.kill()
        decoy.wait(10)
    assert killed, "no ACS actor process was found to kill"
    assert decoy.pid not in killed.values()
    # The cluster saw the deaths it was dealt: each killed actor was restarted under its id.
    assert all(state.actors(actor_id=aid)["NumRestarts"] >= 1 for aid in killed)
    assert_exactly_once(out, set(synthetic6["query_ids"]), K)
    assert "model_error" not in set(read(out, "boxes").column("status").to_pylist())
    assert summary["counters"]["shards_written"] == summary["counters"]["shards"]
    # The kill really happened mid-run: some shard was finished only after it.
    finished = [datetime.fromisoformat(m["finished"]).timestamp() for m in markers(out).values()]
    assert max(finished) > kill_time[0]
