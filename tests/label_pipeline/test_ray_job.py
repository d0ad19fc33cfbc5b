"""The labelling job on a real two-node Ray cluster started with the `ray` CLI (two raylets on this
machine), on its own ports and temp dir so it never meets the test session's local instance.

* test_driver_on_two_node_cluster: `python -m jobs.label --address HOST:PORT` from a copy of the
  repository (pipeline/, jobs/, pyproject.toml) as the driver; both ACS actors must land on
  different nodes. Runs everywhere.
* test_job_submit_on_two_node_cluster: the same through `ray job submit --working-dir COPY`
  (`--address auto` inside the job). Needs the Ray dashboard (job server), i.e. `ray[default]`;
  skipped with the import error when only `ray[data]` is installed (`ray start
  --include-dashboard=true` then fails with "Cannot include dashboard with missing packages").

Resources: each node has 3 logical CPUs and each actor asks for 2, so two actors cannot share a
node (one per node), and each node keeps 1 CPU for the `load_images` tasks. With the brief's
1-CPU nodes and `--cpus-per-actor 1` the two actors take every CPU of the cluster and the 1-CPU
`load_images` tasks can never be scheduled: the job hangs.

Auth: Ray 2.60 enables token authentication for `ray start --head`; every process of this cluster
(nodes, driver, probe, CLI) gets a fresh random RAY_AUTH_TOKEN, never the user's ~/.ray token.
Teardown: SIGTERM to the `ray start --block` processes this test started (they stop their nodes),
then SIGKILL by pid for anything left whose command line names this cluster's temp dir. Never
`ray stop`, which would kill every Ray process of the user (the session cluster, other jobs).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _label_helpers import K, N, PARROT_TOKENS, assert_exactly_once, markers, run_json

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAY_CLI = str(Path(sys.executable).with_name("ray"))  # the venv's ray: the cluster runs the venv's python
NODE_CPUS = 3
CPUS_PER_ACTOR = 2
ACS_ACTOR = "MapWorker(MapBatches(ACSStage))"


def _dashboard_error():
    import ray._private.utils

    return ray._private.utils.get_dashboard_dependency_error()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    # Every per-node port explicit: two raylets on one machine must not both take the defaults.
    out = []
    for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):
        out += [flag, str(_free_port())]
    return out + ["--node-ip-address=127.0.0.1", f"--num-cpus={NODE_CPUS}",
                  f"--object-store-memory={200 * 1024 ** 2}", "--disable-usage-stats"]


# Runs in a subprocess (this process is attached to the session's cluster): nodes and actors as
# the GCS sees them. Actor placement comes from the private GCS actor table because the public
# state API (ray.util.state) needs the dashboard.
PROBE = r"""
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
from ray._private import state
nodes = [{"id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU")} for n in ray.nodes()]
actors = [{"id": aid, "cls": a.get("ActorClassName") or a.get("ClassName"), "state": a.get("State"),
           "node": (a.get("Address") or {}).get("NodeID")} for aid, a in state.actors().items()]
print("PROBE" + json.dumps({"nodes": nodes, "actors": actors}))
"""


class Cluster:
    def __init__(self):
        # Short root: Ray's Unix socket paths live under it (108-byte limit).
        self.tmp = tempfile.mkdtemp(prefix="acsray-", dir="/tmp")
        self.procs: list[subprocess.Popen] = []
        self.gcs_port, self.dash_port = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = _dashboard_error() is None
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0",
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # test cluster: no 30 s drain on SIGTERM
        self.env = env

    def _start(self, args: list[str], log: str) -> subprocess.Popen:
        p = subprocess.Popen([RAY_CLI, "start", "--block", *args], env=self.env, start_new_session=True,
                             stdout=open(os.path.join(self.tmp, log), "wb"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        return Path(self.tmp, name).read_text(errors="replace")[-3000:]

    def start(self) -> None:
        dash = (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash_port}"]
                if self.dashboard else ["--include-dashboard=false"])
        head = self._start(["--head", f"--port={self.gcs_port}", f"--temp-dir={self.tmp}", *dash, *_node_ports()],
                           "head.log")
        address_file = Path(self.tmp, "ray_current_cluster")  # written once the head is up
        deadline = time.time() + 120
        while not address_file.exists():
            assert head.poll() is None, f"ray start --head exited {head.returncode}:\n{self.log('head.log')}"
            assert time.time() < deadline, f"head did not come up:\n{self.log('head.log')}"
            time.sleep(0.5)
        worker = self._start([f"--address={self.address}", *_node_ports()], "worker.log")
        deadline = time.time() + 120
        while True:
            assert worker.poll() is None, f"ray start (worker) exited {worker.returncode}:\n{self.log('worker.log')}"
            alive = [n for n in self.probe()["nodes"] if n["alive"]]
            if len(alive) == 2:
                return
            assert time.time() < deadline, f"second node did not join: {alive}\n{self.log('worker.log')}"
            time.sleep(1)

    def probe(self) -> dict:
        r = subprocess.run([sys.executable, "-c", PROBE, self.address], env=self.env, capture_output=True,
                           text=True, timeout=120)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE")]
        assert lines, f"probe failed ({r.returncode}):\n{r.stderr[-3000:]}"
        return json.loads(lines[-1][len("PROBE"):])

    def stop(self) -> None:
        for p in reversed(self.procs):  # worker first, then head
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # the group this test created (start_new_session)
                p.wait(timeout=10)
        # Anything this cluster started that outlived its `ray start`: matched by our temp dir.
        me = os.getpid()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == me:
                continue
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if self.tmp.encode() in cmd:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def working_dir(tmp_path_factory) -> Path:
    """A copy of what the job needs: pipeline/, jobs/, pyproject.toml (no .venv, no tests)."""
    wd = tmp_path_factory.mktemp("job-wd")
    for d in ("pipeline", "jobs"):
        shutil.copytree(REPO / d, wd / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "pyproject.toml", wd / "pyproject.toml")
    return wd


def _label_args(data: dict, out: Path, model: Path, address: str, run_id: str) -> list[str]:
    return ["-m", "jobs.label", "--coco", data["ann"], "--images", data["root"], "--output", str(out),
            "--model", str(model), "--num-candidates", str(N), "--max-new-tokens", str(PARROT_TOKENS),
            "--actors", "2", "--cpus-per-actor", str(CPUS_PER_ACTOR), "--batch-size", "2",
            "--address", address, "--no-progress", "--run-id", run_id]


def _check_run(cluster: Cluster, before: set[str], data: dict, out: Path, run_id: str, address: str) -> None:
    ids = set(data["good"])
    assert_exactly_once(out, ids, K)
    j = run_json(out, run_id)
    c = j["counters"]
    assert c["queries"] == len(ids) and c["shards_written"] == c["shards"] == len(markers(out)) == 1
    assert c["status"] == {"ok": len(ids)}
    assert j["config"]["actors"] == 2 and j["config"]["cpus_per_actor"] == CPUS_PER_ACTOR
    assert j["config"]["address"] == address
    # Two nodes, and the run's two ACS actors were placed one on each
    state = cluster.probe()
    alive = {n["id"] for n in state["nodes"] if n["alive"]}
    assert len(alive) == 2 and all(n["cpus"] == NODE_CPUS for n in state["nodes"] if n["alive"])
    acs = [a for a in state["actors"] if a["cls"] == ACS_ACTOR and a["id"] not in before]
    assert len(acs) == 2, acs
    assert {a["node"] for a in acs} == alive, (acs, alive)


def _acs_actor_ids(cluster: Cluster) -> set[str]:
    return {a["id"] for a in cluster.probe()["actors"] if a["cls"] == ACS_ACTOR}


def test_driver_on_two_node_cluster(two_nodes, working_dir, parrot_data, parrot_model_dir, tmp_path):
    data = parrot_data["clean"]
    out = tmp_path / "out"
    before = _acs_actor_ids(two_nodes)
    env = dict(two_nodes.env, PYTHONPATH=str(working_dir))
    r = subprocess.run([sys.executable, *_label_args(data, out, parrot_model_dir, two_nodes.address, "driver-2n")],
                       cwd=working_dir, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert "run driver-2n: 7 queries in 1 shard(s) (0 already done, 1 written)" in r.stdout
    _check_run(two_nodes, before, data, out, "driver-2n", two_nodes.address)


def test_job_submit_on_two_node_cluster(two_nodes, working_dir, parrot_data, parrot_model_dir, tmp_path):
    if not two_nodes.dashboard:
        pytest.skip(f"`ray job submit` needs the dashboard's job server (ray[default]); "
                    f"this environment lacks it: {_dashboard_error()!r}")
    data = parrot_data["clean"]
    out = tmp_path / "out"
    before = _acs_actor_ids(two_nodes)
    sub_id = f"acs-label-{secrets.token_hex(4)}"
    r = subprocess.run([RAY_CLI, "job", "submit", "--address", f"http://127.0.0.1:{two_nodes.dash_port}",
                        "--submission-id", sub_id, "--working-dir", str(working_dir), "--",
                        "python", *_label_args(data, out, parrot_model_dir, "auto", "job-2n")],
                       env=two_nodes.env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-3000:]}"
    st = subprocess.run([RAY_CLI, "job", "status", "--address", f"http://127.0.0.1:{two_nodes.dash_port}", sub_id],
                        env=two_nodes.env, capture_output=True, text=True, timeout=60)
    assert f"Job '{sub_id}' succeeded" in st.stdout + st.stderr, st.stdout + st.stderr
    assert "run job-2n: 7 queries in 1 shard(s) (0 already done, 1 written)" in r.stdout
    _check_run(two_nodes, before, data, out, "job-2n", "auto")


def test_driver_killed_and_rerun(two_nodes, synthetic6, parrot_model_dir, tmp_path):
    """kill -9 the driver after its first shard; the same command again finishes the job: finished
    shards are skipped (run JSON counters), every query exactly once."""
    out = tmp_path / "out"

    def cmd(run_id):
        return [sys.executable, "-m", "jobs.label", "--coco", synthetic6["ann"], "--images", synthetic6["root"],
                "--output", str(out), "--model", str(parrot_model_dir), "--num-candidates", str(N),
                "--max-new-tokens", str(PARROT_TOKENS), "--batch-size", "1", "--shard-size", "3",
                "--address", two_nodes.address, "--no-progress", "--run-id", run_id]

    driver = subprocess.Popen(cmd("crash-1"), env=two_nodes.env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not markers(out):
        assert driver.poll() is None, "the driver finished or failed before its first shard"
        assert time.time() < deadline, "no shard finished in time"
        time.sleep(0.05)
    driver.kill()
    driver.wait(timeout=30)
    done = set(markers(out))
    shards = -(-len(synthetic6["query_ids"]) // 3)
    assert 1 <= len(done) < shards, "the kill should land mid-run"
    assert not (out / "_runs" / "crash-1.json").exists()  # the killed run never finished

    r = subprocess.run(cmd("crash-2"), env=two_nodes.env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    c = run_json(out, "crash-2")["counters"]
    assert c["shards"] == shards and c["shards_skipped"] == len(done)
    assert c["shards_written"] == shards - len(done)
    assert_exactly_once(out, set(synthetic6["query_ids"]), K)
