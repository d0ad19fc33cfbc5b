"""Worker crash: kill -9 an ACS actor's process mid-run; Ray restarts it, the job finishes, and
every query appears exactly once with no `model_error` rows."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import datetime

import pytest

from _label_helpers import K, PARROT_TOKENS, assert_exactly_once, label_config, markers, read


def _actor_pids() -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if "MapBatches(ACSStage)" in cmd and "__init__" not in cmd:
            pids.append(int(pid))
    return pids


@pytest.mark.slow
def test_actor_killed_mid_run(ray_session, synthetic6, parrot_model_dir, tmp_path):
    from pipeline.label import run_label

    out = tmp_path / "out"
    killed: list[int] = []
    kill_time: list[float] = []
    stop = threading.Event()

    def killer():
        # Kill the actor as soon as the first shard is finished: the others are still to come.
        deadline = time.time() + 120
        while not stop.is_set() and time.time() < deadline:
            pids = _actor_pids()
            if pids and (out / "_shards").exists():
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                kill_time.append(time.time())
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    cfg = label_config(output=str(out), coco=synthetic6["ann"], images=synthetic6["root"], model=str(parrot_model_dir),
                       max_new_tokens=PARROT_TOKENS, batch_size=1, shard_size=3)
    summary = run_label(cfg)
    stop.set()
    t.join(5)
    assert killed, "no ACS actor process was found to kill"
    assert_exactly_once(out, set(synthetic6["query_ids"]), K)
    assert "model_error" not in set(read(out, "boxes").column("status").to_pylist())
    assert summary["counters"]["shards_written"] == summary["counters"]["shards"]
    # The kill really happened mid-run: some shard was finished only after it.
    finished = [datetime.fromisoformat(m["finished"]).timestamp() for m in markers(out).values()]
    assert max(finished) > kill_time[0]
