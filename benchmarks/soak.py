"""Soak: `acs label` at scale on a two-node Ray cluster, from and to S3, through an actor's death,
a node's loss and the job stopped and submitted again; nothing may be lost, doubled, or grow.

    python -m benchmarks.soak [--queries 20000] [--shards 200] [--candidates 2] [--actors 2]
        [--faults-at 0.3,0.4,0.5 | --faults-at none] [--data-dir out/soak/data] [--timeout-s S]

One command that stops by itself (every wait has a deadline; the cluster, the job and the S3
server are torn down whatever happens):

1. data: `make_synthetic` shapes/test scenes (about 3.5 queries per image) as img2dataset-style
   Parquet shards, generated once under --data-dir and reused, uploaded to moto's S3 server on
   127.0.0.1 (`ThreadedMotoServer`, as the tests use);
2. cluster: `ray start --head` and a second `ray start --address` on this machine, each with its
   own ports, temp dir and 3 logical CPUs; an ACS actor takes 2, so there is one on each node
   and each node keeps 1 CPU for image decoding; everything on 127.0.0.1 (see RAY_START);
3. job: `ray job submit` of `python -m jobs.label --shards s3://... --output s3://...` with the
   shipped organism, box decoding, N = --candidates, one torch thread per actor;
4. faults, when the finished shards (markers on S3) hold these fractions of the queries:
   kill -9 of one ACS actor's process; kill -9 of the second node's raylet (the node is lost),
   then the node started again; `ray job stop`, then the same job submitted again (it resumes);
   every process is found by pid through this cluster's own state (state API, node records,
   the `ray start` processes this script started), never by name;
5. while it runs, every --sample-s: the RSS of every process of the cluster by kind (driver,
   ACS actor, other: raylets, GCS, dashboard, agents, idle and decoding workers), sockets of
   those processes that touch an address other than loopback, and each node's spilled bytes;
6. at the end the tables are read back with polars and counted against the listing.

It prints a table and ends with one JSON line (see benchmarks/README.md for the fields).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).with_name("ray"))
BUCKET = "acs-soak"
ACS_ACTOR = "MapWorker(MapBatches(ACSStage))"
STATUSES = {"ok", "no_box", "image_error", "query_error", "model_error"}  # docs/schema.md
NODE_CPUS = 3
CPUS_PER_ACTOR = 2
# moto accepts any credentials; they reach the job through the nodes' environment, never its command line
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "soak", "AWS_SECRET_ACCESS_KEY": "soak-secret", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_REGION": "us-east-1"}

# Every process of the cluster on loopback. Ray maps an explicit 127.0.0.1 (for --node-ip-address,
# --address, a driver's or an agent's ray.init address) to the machine's outward address
# (`services.resolve_ip_for_localhost`): a plain `ray start --node-ip-address 127.0.0.1` registers
# the node as eth0's address, and the dashboard's job agent then tries the GCS there. Ray's
# single-machine switch (LOOPBACK_ENV, as pipeline.label.init_ray uses it) keeps every process it
# is in on loopback; it is in the nodes' environment, so the GCS, raylets, agents, workers and the
# job's driver inherit it. It also refuses `ray start --address` (a second node), so the `ray
# start` process itself runs with the switch on and its own address pinned to loopback instead.
RAY_START = ("import ray._private.ray_constants as c, ray._private.services as s; c.ENABLE_RAY_CLUSTER = True; "
             "s.get_node_ip_address = lambda address=None: '127.0.0.1'; "
             "from ray.scripts.scripts import main; main()")
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_for(what: str, fn, timeout: float, every: float = 1.0, unless=None):
    """fn() until it returns something truthy (or `unless()` does: then None); TimeoutError naming
    `what` after `timeout` s."""
    deadline = time.time() + timeout
    while True:
        got = fn()
        if got:
            return got
        if unless is not None and unless():
            return None
        if time.time() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ data
def make_data(root: Path, queries: int, shards: int) -> dict:
    """At least `queries` queries of shapes/test in about `shards` Parquet shards (reused when the
    folder already holds this size); the expected query ids come from listing the local shards."""
    from pipeline.inputs import list_shards
    from pipeline.organism.scenes import GEOMETRY, make_scene, make_synthetic

    per_image = sum(len(make_scene("shapes", "test", i).queries()) for i in range(64)) / 64
    n = math.ceil(queries / per_image * 1.01)
    for _ in range(5):
        shard_size = math.ceil(n / shards)
        summary_file = root / "summary.json"
        old = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        if (old.get("n_images"), old.get("geometry"), len(old.get("paths", {}).get("shards", [])),
                old.get("shard_size")) != (n, GEOMETRY, math.ceil(n / shard_size), shard_size):
            log(f"generating {n} images in shards of {shard_size} under {root}")
            old = make_synthetic(str(root), "shapes", "test", n, seed=0, shard_size=shard_size)
            old["shard_size"] = shard_size
            summary_file.write_text(json.dumps(old, indent=2))
        if old["n_queries"] >= queries:
            break
        n = math.ceil(n * queries / old["n_queries"]) + 1
    listed = list_shards(str(root / "shards"))
    ids = [q["query_id"] for q in listed]
    assert len(ids) == len(set(ids)) == old["n_queries"] >= queries, (len(ids), old["n_queries"], queries)
    return {"root": root, "shards": sorted(old["paths"]["shards"]), "query_ids": set(ids), "n_images": n}


class S3:
    """moto's S3 server on 127.0.0.1 in this process, with one bucket."""

    def __init__(self):
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        os.environ.update(CREDENTIALS)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.bytes: Counter = Counter()  # "GET shards" / "PUT out" / ... -> bytes served or received
        self.server._server.app = self._counting(self.server._server.app)  # before any request (moto's WSGI app)
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        self.client.create_bucket(Bucket=BUCKET)
        self._markers: dict[str, tuple[str, dict]] = {}

    def stop(self) -> None:
        self.server.stop()

    def _counting(self, app):
        """WSGI middleware: bytes of request and response bodies by method and top folder (shards/,
        out/), so the soak can say what each query costs the object store."""
        def wrapped(environ, start_response):
            path = environ.get("PATH_INFO", "")
            where = next((w for w in ("shards", "out") if f"/{BUCKET}/{w}/" in path), "other")
            kind = f"{environ['REQUEST_METHOD']} {where}"
            self.bytes[kind + " received"] += int(environ.get("CONTENT_LENGTH") or 0)
            self.bytes[kind + " requests"] += 1
            for chunk in app(environ, start_response):
                self.bytes[kind + " sent"] += len(chunk)
                yield chunk
        return wrapped

    def upload(self, files: list[str], prefix: str) -> None:
        for f in files:
            self.client.upload_file(f, BUCKET, f"{prefix}/{os.path.basename(f)}")

    def objects(self, prefix: str) -> list[dict]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            out += page.get("Contents", [])
        return out

    def markers(self) -> dict[str, dict]:
        """shard id -> its marker (queries, finished as a timestamp); a rewritten marker is read again."""
        out = {}
        for o in self.objects("out/_shards/"):
            key, tag = o["Key"], o["ETag"]
            if self._markers.get(key, ("",))[0] != tag:
                m = json.loads(self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
                m["t"] = datetime.fromisoformat(m["finished"]).timestamp()
                self._markers[key] = (tag, m)
            out[key.rsplit("/", 1)[1][:-5]] = self._markers[key][1]
        return out

    def read_json(self, key: str) -> dict | None:
        try:
            return json.loads(self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        except self.client.exceptions.NoSuchKey:
            return None

    def table(self, name: str, columns: list[str]):
        import polars as pl

        frames = [pl.read_parquet(io.BytesIO(self.client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()),
                                  columns=columns)
                  for o in self.objects(f"out/{name}/") if o["Key"].endswith(".parquet")]
        return pl.concat(frames) if frames else pl.DataFrame({c: [] for c in columns})


# ------------------------------------------------------------------------------------ processes
def proc_table() -> dict[int, tuple[int, int, float]]:
    """pid -> (parent pid, start time in clock ticks, RSS in MB) of every process on the machine."""
    page_mb = os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d)] = (int(fields[1]), int(fields[19]), int(fields[21]) * page_mb)
    return out


def descendants(roots: set[int], table: dict) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [r for r in roots if r in table]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def _ip4(hexaddr: str) -> str:
    a = hexaddr.split(":")[0]
    if len(a) != 8:  # tcp6: loopback is ::1 or ::ffff:127.x
        return "::1" if a == "0" * 31 + "1" else ("127.x" if a.startswith("0000000000000000FFFF0000") and
                                                  a[-2:] == "7F" else "v6:" + a)
    return ".".join(str(int(a[i:i + 2], 16)) for i in (6, 4, 2, 0))


def non_loopback_sockets(pids: set[int]) -> set[tuple[str, str, str]]:
    """TCP sockets of these processes with a local or remote address off loopback (listeners on
    0.0.0.0 included: they accept from other addresses), as (local, remote, state)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    bad = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] not in inodes:
                continue
            local, remote = _ip4(f[1]), _ip4(f[2])
            ok = lambda a: a.startswith("127.") or a in ("::1", "127.x")  # noqa: E731
            idle_remote = remote in ("0.0.0.0", "v6:" + "0" * 32)
            if not ok(local) or not (ok(remote) or idle_remote):
                bad.add((local, remote, f[3]))
    return bad


class Cluster:
    """Two Ray nodes on this machine, started (and stopped) by this process only."""

    def __init__(self, keep: bool = False):
        self.tmp = tempfile.mkdtemp(prefix="acssoak-", dir="/tmp")  # short: Ray's socket paths live under it
        self.keep = keep
        self.gcs_port, self.dash_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dash_url = f"http://127.0.0.1:{self.dash_port}"
        self.nodes: dict[str, dict] = {}  # name -> {"proc", "ports", "tmp"}
        self.seen: dict[int, int] = {}  # every pid of the cluster ever sampled -> its start time
        self.start_retries = 0
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(CREDENTIALS, **LOOPBACK_ENV, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0",
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),  # never the user's ~/.ray token
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        self.env = env
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=env["RAY_AUTH_TOKEN"])  # this process's state calls
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            os.environ.pop(k, None)

    def start_node(self, name: str, head: bool = False, attempts: int = 3) -> None:
        """`ray start` of one node, retried: it waits a fixed 30 s for its raylet to register with
        the GCS, which a loaded 2-core machine can exceed. A failed attempt's processes are killed
        by the pids it was seen with; the next one gets fresh ports."""
        for attempt in range(1, attempts + 1):
            try:
                self._start_node(name, head)
                return
            except (RuntimeError, TimeoutError) as e:
                self.start_retries += 1
                self._reap(name)
                if attempt == attempts:
                    raise
                log(f"start of node {name} failed (attempt {attempt}), again: {str(e).splitlines()[-1][:200]}")
                if head:
                    self.gcs_port, self.dash_port = free_port(), free_port()
                    self.address = f"127.0.0.1:{self.gcs_port}"
                    self.dash_url = f"http://127.0.0.1:{self.dash_port}"

    def _start_node(self, name: str, head: bool) -> None:
        ports = {f: free_port() for f in ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                                          "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                          "metrics-export-port")}
        tmp = os.path.join(self.tmp, f"{name}-{self.start_retries}")
        args = [f"--{k}={v}" for k, v in ports.items()] + [
            "--node-ip-address=127.0.0.1", f"--node-name={name}", f"--num-cpus={NODE_CPUS}", f"--temp-dir={tmp}",
            f"--object-store-memory={200 * 2 ** 20}", "--disable-usage-stats", "--block"]
        if head:
            args = ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dash_port}", f"--ray-client-server-port={free_port()}", *args]
        else:
            args = [f"--address={self.address}", *args]
        logf = open(os.path.join(self.tmp, f"{name}.log"), "ab")
        proc = subprocess.Popen([sys.executable, "-c", RAY_START, "start", *args], env=self.env, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes[name] = {"proc": proc, "ports": ports, "tmp": tmp}
        wait_for(f"node {name} alive", lambda: self._alive(name), 240, every=2)

    def _alive(self, name: str):
        p = self.nodes[name]["proc"]
        self.pids()  # every process of a starting node is recorded, for _reap and stop
        if p.poll() is not None:
            tail = Path(self.tmp, f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"ray start of {name} exited {p.returncode}:\n{tail}")
        try:
            return [n for n in self.list_nodes() if n.node_name == name and n.state == "ALIVE"]
        except Exception:  # the head's dashboard is still coming up
            return None

    def _reap(self, name: str) -> None:
        """Kill what a failed start of `name` left: its `ray start` (session) and the pids seen in its tree."""
        node = self.nodes.pop(name)
        if node["proc"].poll() is None:
            os.killpg(node["proc"].pid, signal.SIGKILL)
            node["proc"].wait(timeout=10)
        table = proc_table()
        others = self.pids(table)
        for pid, started in list(self.seen.items()):
            if pid in table and table[pid][1] == started and pid not in others and pid != os.getpid():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    # -------------------------------------------------------------------------------- state
    def list_nodes(self):
        from ray.util.state import list_nodes

        return list_nodes(address=self.dash_url, limit=100, raise_on_missing_output=False)

    def acs_actors(self) -> list:
        from ray.util.state import list_actors

        return list_actors(address=self.dash_url, filters=[("class_name", "=", ACS_ACTOR)], limit=1000,
                           raise_on_missing_output=False)

    def node_id(self, name: str) -> str | None:
        ids = [n.node_id for n in self.list_nodes() if n.node_name == name and n.state == "ALIVE"]
        return ids[0] if ids else None

    def pids(self, table: dict | None = None) -> set[int]:
        table = table or proc_table()
        pids = descendants({n["proc"].pid for n in self.nodes.values() if n["proc"].poll() is None}, table)
        for p in pids:
            self.seen.setdefault(p, table[p][1])
        return pids

    def kill_pid(self, pid: int) -> None:
        """kill -9 of a process of this cluster (refused for any other)."""
        if pid not in self.pids():
            raise RuntimeError(f"pid {pid} is not a process of this cluster")
        os.kill(pid, signal.SIGKILL)

    def raylet_pid(self, name: str) -> int:
        """The raylet of node `name`: the child of its `ray start` with the node manager port given to it."""
        node = self.nodes[name]
        table = proc_table()
        flag = f"--node_manager_port={node['ports']['node-manager-port']}"
        found = [p for p in descendants({node["proc"].pid}, table)
                 if cmdline(p)[:1] and cmdline(p)[0].endswith("/raylet") and flag in cmdline(p)]
        if len(found) != 1:
            raise RuntimeError(f"raylet of {name}: found {found}")
        return found[0]

    def node_stats(self, name: str):
        from ray._private.internal_api import node_stats

        return node_stats("127.0.0.1", self.nodes[name]["ports"]["node-manager-port"], include_memory_info=False)

    def stop(self) -> None:
        for n in reversed(list(self.nodes.values())):  # workers first, then the head
            if n["proc"].poll() is None:
                n["proc"].send_signal(signal.SIGTERM)
        for n in reversed(list(self.nodes.values())):
            try:
                n["proc"].wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(n["proc"].pid, signal.SIGKILL)  # the session this script created for it
                n["proc"].wait(timeout=10)
        # Anything of this cluster that outlived its `ray start`: by pid, the same process (start time).
        table = proc_table()
        for pid, started in self.seen.items():
            if pid in table and table[pid][1] == started and pid != os.getpid():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ sampling
class Sampler(threading.Thread):
    """Every `every` s: RSS per process of the cluster by kind; every 10 s the ACS actors (state
    API), non-loopback sockets; every 15 s each node's spilled bytes."""

    def __init__(self, cluster: Cluster, every: float):
        super().__init__(daemon=True, name="soak-sampler")
        self.cluster, self.every = cluster, every
        self.stop_ev = threading.Event()
        self.samples: list[dict] = []
        self.driver_pid: int | None = None
        self.actors: dict[int, tuple[str, str]] = {}  # pid -> (actor id, node id)
        self.actor_nodes: set[str] = set()
        self.sockets: set[tuple] = set()
        self.spilled: dict[str, int] = {}  # node name -> most spilled bytes seen
        self.errors: Counter = Counter()

    def refresh_actors(self) -> None:
        alive = {a.pid: (a.actor_id, a.node_id) for a in self.cluster.acs_actors() if a.state == "ALIVE" and a.pid}
        self.actors = alive
        self.actor_nodes |= {node for _, node in alive.values()}

    def run(self) -> None:
        last_state = last_sock = last_spill = 0.0
        while not self.stop_ev.wait(self.every):
            now = time.time()
            try:
                if now - last_state >= 10:
                    last_state = now
                    self.refresh_actors()
                table = proc_table()
                pids = self.cluster.pids(table)
                s = {"t": now, "driver": 0.0, "actors": {}, "other": 0.0}
                for p in pids:
                    rss = table[p][2]
                    if p == self.driver_pid:
                        s["driver"] = rss
                    elif p in self.actors:
                        s["actors"][self.actors[p][0]] = rss
                    else:
                        s["other"] += rss
                self.samples.append(s)
                if now - last_sock >= 10:
                    last_sock = now
                    self.sockets |= non_loopback_sockets(pids | {os.getpid()})
                if now - last_spill >= 15:
                    last_spill = now
                    for name, n in self.cluster.nodes.items():
                        if n["proc"].poll() is None:
                            b = self.cluster.node_stats(name).store_stats.spilled_bytes_total
                            self.spilled[name] = max(self.spilled.get(name, 0), int(b))
            except Exception as e:  # a node going away mid-sample: counted, the next sample goes on
                self.errors[type(e).__name__] += 1


# ------------------------------------------------------------------------------------ the job
class Jobs:
    def __init__(self, cluster: Cluster, s3: S3, args):
        from ray.job_submission import JobSubmissionClient

        self.cluster, self.s3, self.args = cluster, s3, args
        self.client = JobSubmissionClient(cluster.dash_url)
        self.submitted: list[dict] = []
        self.wd = Path(cluster.tmp, "wd")
        # What the job needs, as `ray job submit --working-dir` uploads it: pipeline/, jobs/, pyproject.toml
        for d in ("pipeline", "jobs"):
            shutil.copytree(REPO / d, self.wd / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy(REPO / "pyproject.toml", self.wd / "pyproject.toml")

    def entrypoint(self, run_id: str) -> list[str]:
        a = self.args
        return ["python", "-m", "jobs.label", "--shards", f"s3://{BUCKET}/shards/", "--output", f"s3://{BUCKET}/out",
                "--storage-option", f"endpoint_url={self.s3.endpoint}", "--num-candidates", str(a.candidates),
                "--actors", str(a.actors), "--cpus-per-actor", str(CPUS_PER_ACTOR), "--torch-threads", "1",
                "--batch-size", str(a.batch_size), "--address", "auto", "--no-progress", "--log-every-s", "5",
                "--run-id", run_id]

    def submit(self) -> str:
        n = len(self.submitted) + 1
        sid, run_id = f"soak-{secrets.token_hex(3)}-{n}", f"soak-{n}"
        r = subprocess.run([RAY_CLI, "job", "submit", "--address", self.cluster.dash_url, "--submission-id", sid,
                            "--working-dir", str(self.wd), "--no-wait", "--", *self.entrypoint(run_id)],
                           env=self.cluster.env, capture_output=True, text=True, timeout=300)
        if r.returncode:
            raise RuntimeError(f"ray job submit failed ({r.returncode}): {r.stderr[-2000:]}")
        self.submitted.append({"submission_id": sid, "run_id": run_id, "t": time.time()})
        log(f"submitted {sid} (run {run_id})")
        return sid

    @property
    def current(self) -> str:
        return self.submitted[-1]["submission_id"]

    def status(self, sid: str | None = None) -> str:
        return str(self.client.get_job_status(sid or self.current).value)

    def ended(self) -> bool:
        return self.status() in ("SUCCEEDED", "FAILED", "STOPPED")

    def driver_pid(self, sid: str | None = None) -> int | None:
        info = self.client.get_job_info(sid or self.current)
        return int(info.driver_info.pid) if info.driver_info and info.driver_info.pid else None

    def stop(self, sid: str | None = None) -> None:
        subprocess.run([RAY_CLI, "job", "stop", "--address", self.cluster.dash_url, sid or self.current],
                       env=self.cluster.env, capture_output=True, text=True, timeout=180)

    def logs(self, folder: Path) -> list[str]:
        """Each job's log, in submission order, also saved under `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for j in self.submitted:
            try:
                text = self.client.get_job_logs(j["submission_id"])
            except Exception as e:
                text = f"logs unavailable: {e}"
            (folder / f"{j['submission_id']}.log").write_text(text)
            out.append(text)
        return out


# ------------------------------------------------------------------------------------ faults
def fault_actor(cluster: Cluster, jobs: Jobs, timeout: float) -> dict:
    """kill -9 of one ACS actor's process; recovered when Ray has restarted it (same actor, new pid)."""
    alive = [a for a in cluster.acs_actors() if a.state == "ALIVE" and a.pid]
    if not alive:
        raise RuntimeError("no live ACS actor to kill")
    a = alive[0]
    t0 = time.time()
    cluster.kill_pid(a.pid)
    log(f"killed ACS actor {a.actor_id[:8]} pid {a.pid}")
    back = wait_for("actor restarted", lambda: [b for b in cluster.acs_actors() if b.actor_id == a.actor_id
                                                and b.state == "ALIVE" and b.pid and b.pid != a.pid],
                    timeout, every=2, unless=jobs.ended)
    return {"kind": "actor_kill", "t": t0, "pid": a.pid, "recovered_s": time.time() - t0,
            "job_ended_first": back is None}


def fault_node(cluster: Cluster, jobs: Jobs, timeout: float) -> dict:
    """kill -9 of the second node's raylet; the node is lost (its `ray start --block` tears down its
    other processes), the GCS marks it dead; then the node is started again under a new name."""
    old = [n for n in cluster.nodes if n != "head"][-1]
    old_id = cluster.node_id(old)
    pid = cluster.raylet_pid(old)
    t0 = time.time()
    cluster.kill_pid(pid)
    log(f"killed raylet pid {pid} of node {old}")
    proc = cluster.nodes[old]["proc"]
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    wait_for(f"node {old} dead", lambda: [n for n in cluster.list_nodes() if n.node_id == old_id
                                          and n.state == "DEAD"], timeout, every=2)
    dead_s = time.time() - t0
    new = f"n2-{len(cluster.nodes)}"
    cluster.start_node(new)
    new_id = cluster.node_id(new)
    back_s = time.time() - t0
    log(f"node {new} joined")
    back = wait_for("ACS actor on the new node", lambda: [a for a in cluster.acs_actors() if a.state == "ALIVE"
                                                          and a.node_id == new_id], timeout, every=2,
                    unless=jobs.ended)
    return {"kind": "node_kill", "t": t0, "raylet_pid": pid, "node_dead_s": dead_s, "node_back_s": back_s,
            "recovered_s": time.time() - t0, "job_ended_first": back is None}


def fault_job(cluster: Cluster, jobs: Jobs, timeout: float) -> dict:
    """`ray job stop`, then the same job submitted again; recovered at its first new finished shard."""
    s3 = jobs.s3
    old = jobs.current
    t0 = time.time()
    jobs.stop(old)
    wait_for("job stopped", lambda: jobs.status(old) in ("STOPPED", "FAILED", "SUCCEEDED"), timeout, every=2)
    stopped_s = time.time() - t0
    finished = sum(int(m["queries"]) for m in s3.markers().values())
    log(f"stopped {old}")
    sid = jobs.submit()
    wait_for("resubmitted job running", lambda: jobs.status(sid) != "PENDING", timeout, every=2)
    if jobs.status(sid) == "SUCCEEDED":  # the stop came after the last shard: nothing to resume
        return {"kind": "job_stop", "t": t0, "stopped_s": stopped_s, "recovered_s": time.time() - t0,
                "finished_queries": finished}

    def first_new():
        if jobs.status(sid) in ("FAILED", "STOPPED", "SUCCEEDED"):
            return True
        return [m for m in s3.markers().values() if m["t"] > t0 + stopped_s]

    wait_for("first shard of the resubmitted job", first_new, timeout, every=2)
    return {"kind": "job_stop", "t": t0, "stopped_s": stopped_s, "recovered_s": time.time() - t0,
            "finished_queries": finished}


FAULTS = [("actor_kill", fault_actor), ("node_kill", fault_node), ("job_stop", fault_job)]


# ------------------------------------------------------------------------------------ figures
# `acs label --log-every-s` lines in a job's log: progress by query. Finished shards (markers) are
# too coarse a clock: the batches of several shards interleave, so shards finish in bursts.
PROGRESS = re.compile(r"acs label progress (\S+): (\d+)/(\d+) queries labelled")


def labelled_curve(logs: list[str]) -> tuple[list[tuple[float, int]], list[int]]:
    """(time, queries labelled so far by all the soak's jobs in turn) from their progress lines,
    and the queries each job labelled."""
    pts, per_job, base = [], [], 0
    for text in logs:
        last = 0
        for m in PROGRESS.finditer(text):
            last = int(m.group(2))
            pts.append((datetime.fromisoformat(m.group(1)).timestamp(), base + last))
        per_job.append(last)
        base += last
    return pts, per_job


def time_at(curve, q: float) -> float:
    """First time the curve reaches q."""
    return next(t for t, d in curve if d >= q)


def rate(curve, q0: float, q1: float) -> float | None:
    """Queries per second between the points where the curve reaches q0 and q1."""
    (ta, da), (tb, db) = [next((t, d) for t, d in curve if d >= q) for q in (q0, q1)]
    return (db - da) / (tb - ta) if tb > ta else None


def done_between(curve, a: float, b: float) -> int:
    return sum(d1 - d0 for (t0, d0), (t1, d1) in zip(curve, curve[1:]) if a < t1 <= b)


def figures(curve, samples, faults, total: int, t_begin: float) -> dict:
    """Throughput per minute and by quarter of the work (from the first labelled batch: start-up
    is not throughput), the time each fault cost, RSS peaks per kind per minute and by quarter
    (the first quarter from the job's submission, so the model load is in it)."""
    curve = [p for p in curve if p[1] > 0]
    work = curve[-1][1]  # every query once, plus what the job stop made the resubmitted job redo
    t_first, t_last = curve[0][0], curve[-1][0]
    q1 = rate(curve, curve[0][1], work * 0.25)
    q4 = rate(curve, work * 0.75, work)
    mean = rate(curve, curve[0][1], work)
    per_min = [round(done_between(curve, t_first + 60 * i, t_first + 60 * (i + 1)) / 60, 3)
               for i in range(max(1, math.ceil((t_last - t_first) / 60)))]
    steady = q1 or mean
    for f in faults:
        # the fault's window (until recovered) less the work done in it at the first quarter's rate,
        # plus the work it threw away (a stopped job's unfinished shards), at that rate
        end = f["t"] + f["recovered_s"]
        f["cost_s"] = round(max(0.0, f["recovered_s"] - done_between(curve, f["t"], end) / steady)
                            + f.get("lost_queries", 0) / steady, 1)
    t25, t75 = time_at(curve, work * 0.25), time_at(curve, work * 0.75)

    def peaks(a, b):
        win = [s for s in samples if a <= s["t"] <= b]
        return {"driver": max((s["driver"] for s in win), default=0.0),
                "actor": max((max(s["actors"].values(), default=0.0) for s in win), default=0.0),
                "other": max((s["other"] for s in win), default=0.0)}

    first, last, whole = peaks(t_begin, t25), peaks(t75, t_last), peaks(0, float("inf"))
    rss_min = {k: [] for k in whole}
    t_s0 = samples[0]["t"] if samples else t_first
    for i in range(math.ceil((samples[-1]["t"] - t_s0) / 60) if samples else 0):
        p = peaks(t_s0 + 60 * i, t_s0 + 60 * (i + 1))
        for k in rss_min:
            rss_min[k].append(round(p[k], 1))
    return {
        "throughput_mean_qps": mean and round(mean, 3),
        "throughput_qps": per_min, "throughput_first_qps": q1 and round(q1, 3),
        "throughput_last_qps": q4 and round(q4, 3),
        "throughput_last_over_first": round(q4 / q1, 3) if q1 and q4 else None,
        "rss_mb": {k: {"peak": round(whole[k], 1), "first_quarter": round(first[k], 1),
                       "last_quarter": round(last[k], 1), "per_minute": rss_min[k]} for k in whole},
        "rss_last_over_first": {k: (round(last[k] / first[k], 3) if first[k] else None) for k in whole},
        "labelling_s": round(t_last - t_first, 1),
        "labelled_work": work,
        # all the time the faults cost: the labelling span less the queries at the first quarter's rate
        "fault_time_lost_s": round(max(0.0, (t_last - t_first) - total / steady), 1),
    }


def count_outputs(s3: S3, expected: set[str], k: int) -> dict:
    boxes = s3.table("boxes", ["query_id", "status"])
    cands = s3.table("candidates", ["query_id", "cand_idx"])
    attn = s3.table("attention", ["query_id", "cand_idx"])  # only candidates with a box have entropy rows
    ids = set(boxes["query_id"].to_list())
    statuses = dict(Counter(boxes["status"].to_list()))
    return {"boxes_rows": boxes.height, "candidates_rows": cands.height, "attention_rows": attn.height,
            "duplicates": boxes.height - len(ids), "missing": len(expected - ids), "unexpected": len(ids - expected),
            "candidate_pairs_unique": cands.unique(["query_id", "cand_idx"]).height == cands.height == k * len(ids),
            "attention_pairs_in_candidates": attn.unique(["query_id", "cand_idx"]).height == attn.height
            == attn.join(cands, on=["query_id", "cand_idx"], how="semi").height,
            "statuses": statuses,
            "statuses_accounted": sum(statuses.values()) == boxes.height and set(statuses) <= STATUSES}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=20000, help="at least this many queries")
    ap.add_argument("--shards", type=int, default=200, help="about this many input (and output) shards")
    ap.add_argument("--candidates", type=int, default=2, help="sampled candidates N (greedy on top)")
    ap.add_argument("--actors", type=int, default=2, help="ACS actors (one per node at 2 of each node's 3 CPUs)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--faults-at", default="0.3,0.4,0.5",
                    help="fractions of the queries finished at which the actor, the node and the job are killed "
                         "(in that order; `none` for a run without faults)")
    ap.add_argument("--data-dir", default="out/soak/data", help="generated shards, reused across runs")
    ap.add_argument("--sample-s", type=float, default=2.0, help="seconds between RSS samples")
    ap.add_argument("--fault-timeout-s", type=float, default=900, help="most seconds a fault may take to recover")
    ap.add_argument("--timeout-s", type=float, default=0,
                    help="most seconds for the whole run (0: 30 min + 1 s per query)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the cluster's temp dir (logs)")
    args = ap.parse_args(argv)
    at = [] if args.faults_at == "none" else [float(x) for x in args.faults_at.split(",")]
    schedule = list(zip(at, FAULTS))
    timeout = args.timeout_s or 1800 + args.queries
    t_start = time.time()

    data = make_data(Path(args.data_dir), args.queries, args.shards)
    log(f"{len(data['query_ids'])} queries in {len(data['shards'])} shards")
    s3 = S3()
    try:
        return _soak(args, data, s3, schedule, at, timeout, t_start)
    finally:
        s3.stop()


def _soak(args, data: dict, s3: S3, schedule: list, at: list[float], timeout: float, t_start: float) -> int:
    total, k = len(data["query_ids"]), args.candidates + 1
    cluster = jobs = sampler = None
    faults, job_states, logs = [], [], []
    try:
        s3.upload(data["shards"], "shards")
        cluster = Cluster(keep=args.keep_tmp)
        cluster.start_node("head", head=True)
        cluster.start_node("n2")
        log(f"cluster up: {cluster.address}, dashboard {cluster.dash_url}, temp {cluster.tmp}")
        sampler = Sampler(cluster, args.sample_s)
        sampler.start()
        jobs = Jobs(cluster, s3, args)
        jobs.submit()
        deadline = t_start + timeout
        last_log = 0.0
        while True:
            if time.time() > deadline:
                raise TimeoutError(f"the soak did not finish within {timeout:.0f} s")
            st = jobs.status()
            if sampler.driver_pid is None or st == "RUNNING":
                sampler.driver_pid = jobs.driver_pid()
            done = sum(int(m["queries"]) for m in s3.markers().values())
            if time.time() - last_log > 30:
                last_log = time.time()
                log(f"{done}/{total} queries in finished shards; job {jobs.current} {st}")
            if st in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            if schedule and done >= schedule[0][0] * total and st == "RUNNING":
                frac, (name, fn) = schedule.pop(0)
                f = fn(cluster, jobs, args.fault_timeout_s)
                f.update(at_fraction=round(done / total, 3), at_s=round(f["t"] - t_start, 1))
                faults.append(f)
                sampler.driver_pid = None
                log(f"{name}: recovered in {f['recovered_s']:.1f} s")
            time.sleep(3)
        job_states = [{"submission_id": j["submission_id"], "run_id": j["run_id"],
                       "status": jobs.status(j["submission_id"])} for j in jobs.submitted]
        if schedule:
            log(f"the job ended before these faults: {[n for _, (n, _) in schedule]}")
    finally:
        if sampler is not None:
            sampler.stop_ev.set()
            sampler.join(30)
        if jobs is not None:
            try:
                if jobs.status() in ("PENDING", "RUNNING"):
                    jobs.stop()
            except Exception:
                pass
            logs = jobs.logs(Path(args.data_dir).parent / "logs")
        if cluster is not None:
            cluster.stop()
        log("cluster stopped")
    counted = count_outputs(s3, data["query_ids"], k)
    runs = [s3.read_json(f"out/_runs/{j['run_id']}.json") for j in jobs.submitted]
    sizes = {t: sum(o["Size"] for o in s3.objects(f"out/{t}/")) for t in ("boxes", "candidates", "attention")}
    curve, per_job = labelled_curve(logs)
    for f in faults:  # what the stop threw away: the stopped job's labelled queries in no finished shard
        if f["kind"] == "job_stop" and len(per_job) > 1:
            f["lost_queries"] = max(0, per_job[0] - f.pop("finished_queries"))
    fig = figures(curve, sampler.samples, faults, total, jobs.submitted[0]["t"]) if curve else {}
    resumed = [r for r in runs[1:] if r]
    labelled = sum(int(r["counters"]["rows"].get("boxes", 0)) for r in runs if r)
    result = {
        "queries": total, "shards": len(data["shards"]), **counted,
        "faults": [{k2: (round(v, 1) if isinstance(v, float) else v) for k2, v in f.items() if k2 != "t"}
                   for f in faults],
        "faults_missed": [n for _, (n, _) in schedule],
        "fault_cost_s": round(sum(f.get("cost_s", 0) for f in faults), 1),
        "labelled_per_job": per_job,
        **{k2: v for k2, v in fig.items()},
        "resume_list_s": resumed[0]["timings"]["list_s"] if resumed else None,
        "resume_shards_skipped": resumed[0]["counters"]["shards_skipped"] if resumed else None,
        "object_store_spilled_mb": round(sum(sampler.spilled.values()) / 2 ** 20, 1),
        "non_loopback_sockets": sorted(map(list, sampler.sockets)),
        "actor_nodes": len(sampler.actor_nodes),
        "jobs": job_states,
        # inside the actors, per query, over the runs that wrote a run JSON (a stopped job writes none)
        "actor_s_per_query": (round(sum(r["timings"]["acs_actor_s"] for r in runs if r) / labelled, 4)
                              if labelled else None),
        "s3_kb_per_query": {k2: round(v / 1e3 / max(1, total), 1) for k2, v in sorted(s3.bytes.items())
                            if k2.endswith(("sent", "received")) and v >= 1000},
        "s3_requests_per_query": {k2[:-9]: round(v / max(1, total), 2) for k2, v in sorted(s3.bytes.items())
                                  if k2.endswith(" requests")},
        "output_bytes_per_query": {t: round(b / max(1, total)) for t, b in sizes.items()},
        "rows_written_by_runs": labelled,
        "shards_open_max": max((r["counters"].get("shards_open_max", 0) for r in runs if r), default=None),
        "sampler_errors": dict(sampler.errors),
        "node_start_retries": cluster.start_retries if cluster else None,
        "settings": {"candidates": args.candidates, "actors": args.actors, "batch_size": args.batch_size,
                     "node_cpus": NODE_CPUS, "cpus_per_actor": CPUS_PER_ACTOR, "faults_at": at,
                     "decode": "box", "model": "organism"},
        "wall_s": round(time.time() - t_start, 1),
    }
    print(f"soak: {total} queries, {result['shards']} shards, {len(faults)} fault(s); boxes rows "
          f"{result['boxes_rows']}, duplicates {result['duplicates']}, missing {result['missing']}; "
          f"statuses {result['statuses']}")
    for f in result["faults"]:
        print(f"  {f['kind']:<11} at {f['at_fraction']:.0%} of the queries: recovered in {f['recovered_s']} s, "
              f"cost {f.get('cost_s')} s")
    if fig:
        print(f"  throughput {fig['throughput_mean_qps']} q/s from the first labelled batch to the last; per minute "
              f"{fig['throughput_qps']}")
        print(f"  throughput first quarter {fig['throughput_first_qps']} q/s, last quarter "
              f"{fig['throughput_last_qps']} q/s, ratio {fig['throughput_last_over_first']}")
        print(f"  RSS peak MB {({k2: v['peak'] for k2, v in fig['rss_mb'].items()})}, last/first quarter "
              f"{fig['rss_last_over_first']}")
    print(f"  resume listing {result['resume_list_s']} s; spilled {result['object_store_spilled_mb']} MB; "
          f"non-loopback sockets {len(result['non_loopback_sockets'])}; ACS actors on {result['actor_nodes']} nodes")
    from benchmarks.common import emit

    emit(result)
    ok = (result["duplicates"] == 0 and result["missing"] == 0 and not result["faults_missed"]
          and job_states and job_states[-1]["status"] == "SUCCEEDED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
