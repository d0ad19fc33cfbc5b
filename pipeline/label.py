"""The labelling job: list -> skip finished shards -> Ray Data stages -> per-shard Parquet + markers.

`run_label(cfg)` is what `acs label` and `python -m jobs.label` call; tests call it directly.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from .schema import BOXES_SCHEMA, CANDIDATES_SCHEMA, attention_schema
from .storage import DEFAULT_BACKOFF_S, DEFAULT_RETRIES, Output, retry_io


@dataclass
class LabelConfig:
    """Resolved configuration of one labelling run (written to _runs/RUN_ID.json, minus secrets)."""

    output: str = field(metadata={"help": "output prefix (local path or fsspec URL such as s3://bucket/run)"})
    coco: str | None = field(default=None, metadata={"help": "COCO annotation JSON: queries from ground truth"})
    images: str | None = field(default=None, metadata={"help": "image root for --coco / --queries"})
    queries: str | None = field(default=None, metadata={"help": "query manifest (Parquet/CSV/JSONL: image, category)"})
    shards: str | None = field(default=None, metadata={"help": "image shards (img2dataset-style Parquet or WebDataset .tar), glob or folder"})
    categories: list[str] | None = field(default=None, metadata={"help": "categories to query in every shard image"})
    model: str = field(default="organism", metadata={"help": "hub id, local directory or `organism`"})
    selector: str = field(default="auto", metadata={"help": "selector for boxes/: auto = acs-learned with a regressor, else acs-free"})
    num_candidates: int = field(default=10, metadata={"help": "sampled candidates N (greedy comes on top)"})
    temperature: float | None = field(default=None, metadata={
        "help": "sampling temperature (default: the model's own from its acs_model.json, the organism's chosen on "
                "calib; else 1.0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens generated per candidate at most"})
    decode: str = field(default="box", metadata={
        "help": "box: force the answer's opening and stop each candidate when its box closes; full: decode "
                "whole answers"})
    seed: int = field(default=0, metadata={"help": "sampling seed (per-query generators derive from it)"})
    adaptive: bool = field(default=False, metadata={"help": "adaptive K: sample greedy + m first; stop when they agree"})
    adaptive_first: int = field(default=4, metadata={"help": "adaptive K: sampled candidates in the first round (m)"})
    adaptive_iou: float = field(default=0.7, metadata={"help": "adaptive K: agreement = every pairwise IoU >= this"})
    capture: str = field(default="all", metadata={"help": "attention capture: all | profile | none"})
    profile: str | None = field(default=None, metadata={"help": "ACS-Free head profile JSON"})
    regressor: str | None = field(default=None, metadata={"help": "ACS-Learned regressor directory"})
    dump_maps: bool = field(default=False, metadata={"help": "also write pooled attention maps (to train on)"})
    grid: int = field(default=16, metadata={"help": "pooled map size G"})
    batch_size: int = field(default=8, metadata={"help": "queries per model batch inside an actor"})
    shard_size: int = field(default=256, metadata={"help": "queries per output shard (file and resume unit)"})
    actors: int = field(default=1, metadata={"help": "ACS actors (model replicas)"})
    gpus_per_actor: float = field(default=1.0, metadata={"help": "GPUs per actor when CUDA is present"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs reserved per actor"})
    torch_threads: int = field(default=0, metadata={
        "help": "torch intra-op threads per CPU actor (0: the node's CPUs shared among its actors)"})
    address: str | None = field(default=None, metadata={"help": "Ray cluster address (default: a local instance)"})
    storage_options: dict = field(default_factory=dict, metadata={"help": "fsspec options (never logged)", "secret": True})
    io_retries: int = field(default=DEFAULT_RETRIES, metadata={"help": "retries of each storage read, write and listing after a transient fault"})
    io_backoff: float = field(default=DEFAULT_BACKOFF_S, metadata={"help": "seconds before the first storage retry; doubles with each retry"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})
    limit: int | None = field(default=None, metadata={"help": "only the first N queries (smoke runs)"})
    progress: bool = field(default=True, metadata={"help": "show Ray Data progress bars"})
    log_every_s: float = field(default=30.0, metadata={
        "help": "seconds between progress lines on stderr (queries labelled, shards written; 0: none)"})
    run_id: str = field(default="", metadata={"help": "defaults to a timestamp + random suffix"})

    def public(self) -> dict:
        d = asdict(self)
        d["storage_options"] = {k: "***" for k in self.storage_options}  # keys only, values never
        return d


def _list(cfg: LabelConfig) -> tuple[list[dict], str]:
    """Every query of the input, with its shard id. An input that lists nothing, or nothing a model
    could be asked, raises `NoQueries` (an `InputError`) here, before Ray starts or the output's
    configuration record is written (which would then refuse the corrected command)."""
    from .inputs import InputError, assign_shards, dedupe, list_coco, list_manifest, list_shards

    given = [x for x in (cfg.coco, cfg.queries, cfg.shards) if x]
    if len(given) != 1:
        raise ValueError("give exactly one input: --coco ANN.json --images ROOT, --queries MANIFEST, or --shards URL")
    if cfg.categories is not None and not cfg.shards:
        # --coco and --queries name each query's category; ignoring the flag would label other ones
        raise InputError("--categories applies to --shards only; --coco and --queries name each query's category")
    so = cfg.storage_options

    def retried(fn, what):  # a listing is metadata reads only: retried as a whole
        return retry_io(fn, f"list {what}", cfg.io_retries, cfg.io_backoff)

    if cfg.coco:
        if not cfg.images:
            raise ValueError("--coco needs --images ROOT")
        qs, key = retried(lambda: list_coco(cfg.coco, cfg.images, so), cfg.coco), f"coco:{cfg.coco}:{cfg.images}"
    elif cfg.queries:
        qs = retried(lambda: list_manifest(cfg.queries, cfg.images, so), cfg.queries)
        key = f"queries:{cfg.queries}:{cfg.images}"
    else:
        qs, key = retried(lambda: list_shards(cfg.shards, so, cfg.categories), cfg.shards), f"shards:{cfg.shards}"
    qs = dedupe(qs)
    _check_usable(qs, given[0])
    if cfg.limit:
        qs = qs[: cfg.limit]
    return assign_shards(qs, cfg.shard_size, key), key


def _check_usable(queries: list[dict], source: str) -> None:
    """A listing whose every query is unusable on its face (say, every annotation naming an unknown
    category id) would write error rows only: a run with nothing for the model is a wrong input."""
    from .inputs import NoQueries

    if not queries:  # each lister says why itself; this is the guard for any other
        raise NoQueries(f"{source} lists no query")
    if all(q.get("pre_status") for q in queries):
        why = Counter(q["pre_error"] for q in queries).most_common(3)
        raise NoQueries(f"{source}: none of its {len(queries)} listed queries is usable ("
                        + "; ".join(f"{n} x {e}" for e, n in why) + ")")


# A local stat is free; on an object store each would be a request (and a fault to retry), and a
# missing object there still becomes an `image_error` row, so only local images are checked.
IMAGE_PROBES = 8


def check_images_found(queries: list[dict], images: str | None) -> None:
    """Refuse an image root under which none of the first listed local images exists (the usual
    mistake: ROOT/images given where the file names already start with images/), instead of a
    run whose every row is `image_error: file not found`. Single missing images stay rows."""
    from .inputs import InputError

    local = [q["image_uri"] for q in queries if not q.get("pre_status") and not q.get("shard_file")
             and q.get("image_uri") and "://" not in q["image_uri"]][:IMAGE_PROBES]
    if local and not any(os.path.exists(u) for u in local):
        if images:
            raise InputError(f"none of the first {len(local)} images exists under --images {images}, e.g. "
                             f"{local[0]}; is --images the folder the file names are relative to?")
        raise InputError(f"none of the first {len(local)} images the manifest names exists, e.g. {local[0]}; "
                         "relative paths need --images ROOT")


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("acs-pipeline", "torch", "transformers", "ray", "pyarrow", "polars"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# What a shard's rows depend on, besides its queries. An output's shards must all come from one
# value of these: a rerun with another model or sampling setting into the same output would
# otherwise "resume" (skip the finished shards) and leave two configurations in one table.
# (`limit` is not one: a limited run's shards are the first shards of the full run, see _complete.)
RESULT_FIELDS = ("coco", "images", "queries", "shards", "categories", "shard_size", "model",
                 "num_candidates", "temperature", "top_p", "max_new_tokens", "decode", "seed", "adaptive",
                 "adaptive_first", "adaptive_iou", "capture", "dump_maps", "grid")
CONFIG_RECORD = "_config.json"
# Result fields added since records were first written, with the value older runs had: an output
# labelled before `decode` existed decoded whole answers, and resumes as such.
ADDED_RESULT_FIELDS = {"decode": "full"}


class ConfigMismatch(ValueError):
    """The output already holds shards labelled with another configuration."""


def _digest_files(root: str, names: list[str]) -> str:
    """sha256 of small files' bytes (configs, sidecars) and of large files' names and sizes."""
    import hashlib

    h = hashlib.sha256()
    for name in names:
        p = os.path.join(root, name)
        if not os.path.isfile(p):
            continue
        h.update(name.encode())
        if os.path.getsize(p) < 4_000_000:
            with open(p, "rb") as f:
                h.update(f.read())
        else:  # weights: a content hash of gigabytes would cost more than the check is worth
            h.update(str(os.path.getsize(p)).encode())
    return h.hexdigest()[:16]


def result_config(cfg: LabelConfig, selector: str, profile: str | None, regressor: str | None) -> dict:
    """The configuration record of an output: the fields above, the resolved selector, and digests
    of the local model directory (config, acs_model.json with the organism's step count, weight
    file sizes), the head profile and the regressor, so a retrained organism counts as another model."""
    from .models.base import resolve_model

    rec = {k: getattr(cfg, k) for k in RESULT_FIELDS}
    rec["selector"] = selector
    try:
        path = resolve_model(cfg.model)
    except FileNotFoundError:
        path = cfg.model
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith((".json", ".safetensors")))
        rec["model_digest"] = _digest_files(path, names)
    rec["profile_digest"] = _digest_files(os.path.dirname(profile), [os.path.basename(profile)]) if profile else None
    rec["regressor_digest"] = _digest_files(regressor, sorted(os.listdir(regressor))) \
        if regressor and os.path.isdir(regressor) else None
    return rec


def check_config_record(out: Output, rec: dict, done: set[str]) -> None:
    """Write the output's configuration record, or check that it matches this run's."""
    prior = out.read_json(CONFIG_RECORD)
    if prior is None:
        if done:
            raise ConfigMismatch(
                f"{out.url} holds {len(done)} finished shard(s) but no {CONFIG_RECORD} (written by an older "
                "version): it cannot be checked that they match this run; label into a new --output")
        out.write_json(rec, CONFIG_RECORD)
        return
    prior = {**ADDED_RESULT_FIELDS, **prior}
    now = json.loads(json.dumps(rec))  # the types a read-back has (tuples -> lists)
    diff = sorted(k for k in set(prior) | set(now) if prior.get(k) != now.get(k))
    if diff:
        shown = "; ".join(f"{k}: {prior.get(k)!r} -> {now.get(k)!r}" for k in diff[:6])
        raise ConfigMismatch(f"{out.url} was labelled with another configuration ({shown}); finished shards would "
                             "be skipped and mixed with new ones: label into a new --output, or delete it first")


def _complete(out: Output, done: set[str], expected: Counter) -> set[str]:
    """Drop a finished shard that holds fewer queries than this run puts in it.

    Shards are consecutive chunks of one listing, so a run with `--limit` ends on a short shard,
    and a later run with a larger limit (or none) puts more queries under the same shard id. Only
    the highest-numbered finished shard can be short (every run completes the shards below its
    last one), so one marker is read. A short shard is recomputed under the same file names:
    nothing lost, nothing duplicated. A marker holding more queries than expected (a full run
    followed by a limited one) is a superset: kept."""
    mine = sorted(s for s in done if s in expected)
    if not mine:
        return done
    last = mine[-1]
    marker = out.read_json("_shards", f"{last}.json") or {}
    if int(marker.get("queries", 0)) < expected[last]:
        return done - {last}
    return done


def _model_layout(cfg: LabelConfig) -> dict | None:
    """How the model's family writes boxes and which visual tokens capture covers (InternVL: the
    tiles, not the thumbnail), so a reader of the run knows what the attention columns mean."""
    from .models.base import ADAPTERS, family_of, resolve_model

    try:
        cls = ADAPTERS[family_of(resolve_model(cfg.model), cfg.trust_remote_code)]
    except Exception as e:  # the actors already loaded the model; this is a record, not a gate
        return {"error": f"{type(e).__name__}: {e}"}
    return {"family": cls.family, "coord_system": cls.coord_system, "visual_layout": cls.visual_layout}


class ShardsFailed(RuntimeError):
    """Some shards could not be completed (storage faults that outlasted the retries). The other
    shards are written and marked; the run JSON lists the failed ones; rerunning the same command
    completes them. `summary` is the run summary, `failed` maps shard id -> cause."""

    def __init__(self, failed: dict[str, str], summary: dict):
        self.failed, self.summary = failed, summary
        causes = "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:5])
        more = f"; ... and {len(failed) - 5} more" if len(failed) > 5 else ""
        super().__init__(f"{len(failed)} of {summary['counters']['shards']} shard(s) failed and were not written "
                         f"(run {summary['run_id']}); rerun the same command to complete them, finished shards "
                         f"are kept: {causes}{more}")


class ShardWriter:
    """Buffers result rows per shard; writes the shard's three tables and then its marker as soon
    as every query of the shard has come back.

    A shard fails as a whole, without a marker, when one of its rows could not be read (a storage
    fault that outlasted the workers' retries) or one of its writes still fails after the retries;
    the cause is kept in `failed` and the other shards go on. A rerun recomputes exactly the shards
    without a marker, so a failed shard costs a recomputation, never a lost or duplicated row."""

    def __init__(self, out: Output, expected: dict[str, int], dump_maps: bool):
        self.out, self.expected = out, expected
        self.attn_schema = attention_schema(dump_maps)
        self.buf: dict[str, dict[str, list]] = defaultdict(lambda: {"boxes": [], "candidates": [], "attention": []})
        self.written: list[str] = []
        self.failed: dict[str, str] = {}
        self.read_faults: dict[str, str] = {}
        self.status = Counter()
        self.rows = Counter()
        # Most shards buffered at once: the driver's memory, and what a stopped run recomputes.
        self.open_max = 0

    def add(self, shard: str, box: dict, cands: list[dict], attn: list[dict]) -> None:
        from .stages import STORAGE_FAULT

        b = self.buf[shard]
        if box.get("status") == STORAGE_FAULT:
            self.read_faults.setdefault(shard, box.get("error") or "storage fault")
        b["boxes"].append(box)
        b["candidates"].extend(cands)
        b["attention"].extend(attn)
        self.open_max = max(self.open_max, len(self.buf))
        if len(b["boxes"]) == self.expected[shard]:
            self.flush(shard)

    def flush(self, shard: str) -> None:
        b = self.buf.pop(shard)
        if shard in self.read_faults:
            self.failed[shard] = self.read_faults.pop(shard)
            return
        try:
            self._write(shard, b)
        except OSError as e:  # a StorageError from Output (retries exhausted) or a permanent fault
            self.failed[shard] = str(e)

    def _write(self, shard: str, b: dict) -> None:
        self.out.write_table(pa.Table.from_pylist(b["boxes"], schema=BOXES_SCHEMA), "boxes", f"{shard}.parquet")
        self.out.write_table(pa.Table.from_pylist(b["candidates"], schema=CANDIDATES_SCHEMA),
                             "candidates", f"{shard}.parquet")
        self.out.write_table(pa.Table.from_pylist(b["attention"], schema=self.attn_schema),
                             "attention", f"{shard}.parquet")
        counts = Counter(r["status"] for r in b["boxes"])
        # The marker last: its presence means the shard's files are complete.
        self.out.write_json({"shard_id": shard, "queries": len(b["boxes"]), "candidates": len(b["candidates"]),
                             "attention": len(b["attention"]), "status": dict(counts),
                             "finished": dt.datetime.now(dt.timezone.utc).isoformat()}, "_shards", f"{shard}.json")
        self.status.update(counts)
        self.rows.update(boxes=len(b["boxes"]), candidates=len(b["candidates"]), attention=len(b["attention"]))
        self.written.append(shard)


def resolve_selector(cfg: LabelConfig, regressor: str | None) -> str:
    from .scoring import SELECTORS

    if cfg.selector == "auto":
        return "acs-learned" if regressor else "acs-free"
    if cfg.selector not in SELECTORS:
        raise ValueError(f"unknown selector {cfg.selector!r}; choose from {', '.join(SELECTORS)}")
    if cfg.selector == "acs-learned" and not regressor:
        raise ValueError("--selector acs-learned needs a regressor (--regressor DIR); none ships for this model")
    if cfg.selector in ("loc-mass", "loc-heads") and cfg.capture != "all":
        raise ValueError(f"--selector {cfg.selector} needs --capture all")
    return cfg.selector


def check_loc_heads(selector: str, profile: str | None) -> None:
    """--selector loc-heads needs a profile that names localization heads (`acs calibrate` adds them)."""
    from .scoring import HeadProfile

    if selector == "loc-heads" and not (profile and HeadProfile.load(profile).loc_heads):
        raise ValueError("--selector loc-heads needs a head profile with 'loc_heads' (from `acs calibrate` on a "
                         "run made with --capture all); pass --profile PATH")


def _auto_threads(actors: int) -> int:
    """Torch threads for a CPU actor. Ray sets OMP_NUM_THREADS to the actor's reserved CPUs (1 by
    default), which leaves the rest of the node idle: the decode tasks are short and mostly wait on
    I/O. Measured on 2 cores: 1 thread made the job ~1.7x slower per query than a plain loop.
    With A actors over the cluster's nodes, each gets its node's CPUs / (actors per node)."""
    import math

    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if not nodes:
        return 1
    per_node = math.ceil(actors / len(nodes))
    cpus = min(n["Resources"]["CPU"] for n in nodes)
    return max(1, int(cpus // per_node))


LOOPBACK = "127.0.0.1"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(address: str | None = None, **kwargs) -> None:
    """`ray.init`: connect to the cluster named by `address` (or RAY_ADDRESS), else start a local
    instance whose processes all register, listen and talk on 127.0.0.1.

    Ray maps an explicit loopback node address to the machine's outward one
    (`ray._private.services.resolve_ip_for_localhost`: `_node_ip_address="127.0.0.1"` becomes eth0's
    address), so a plain local instance sends its GCS, raylet and worker traffic to that interface.
    Ray's single-machine switch keeps the loopback address: `ENABLE_RAY_CLUSTER` (read from
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 when ray is imported) in this process while the instance
    starts, and the env var in the processes it starts (they inherit this environment; the
    dashboard's agent, for one, connects with ray.init of its own). A local instance never has a
    second node, which is all the switch refuses."""
    import ray
    from ray._private import ray_constants

    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **kwargs)
        return
    was, was_env = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[LOOPBACK_ENV] = "0"
    try:
        ray.init(_node_ip_address=LOOPBACK, **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was
        if was_env is None:
            os.environ.pop(LOOPBACK_ENV)
        else:
            os.environ[LOOPBACK_ENV] = was_env


def progress_line(labelled: int, pending: int, written: int, shards: int) -> str:
    """One line a person (and `benchmarks.soak`, from a job's log) reads: a UTC time, the queries
    this run has labelled so far and the shards it has written."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
    return f"acs label progress {now}: {labelled}/{pending} queries labelled, {written}/{shards} shards written"


def run_label(cfg: LabelConfig) -> dict:
    import ray

    from .assets import default_paths, default_temperature
    from .ground import GroundConfig
    from .sampling import SamplingConfig
    from .stages import ACSStage, load_images

    t_start = time.time()
    cfg.run_id = cfg.run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    cfg.temperature = default_temperature(cfg.model, cfg.temperature)  # resolved: the record says which
    profile, regressor = default_paths(cfg.model, cfg.profile, cfg.regressor)
    selector = resolve_selector(cfg, regressor)
    check_loc_heads(selector, profile)
    out = Output(cfg.output, cfg.storage_options, retries=cfg.io_retries, backoff=cfg.io_backoff)
    queries, source_key = _list(cfg)
    expected = Counter(q["shard_id"] for q in queries)
    done = out.done_shards()
    complete = _complete(out, done, expected)
    pending = [q for q in queries if q["shard_id"] not in complete]
    # Images are looked for only when there is work: a finished output reruns as a no-op even if
    # its images have moved since. And before the configuration record is written: a record of the
    # wrong --images would refuse the corrected command as "another configuration".
    check_images_found(pending, cfg.images)
    check_config_record(out, result_config(cfg, selector, profile, regressor), done)
    done = complete
    t_listed = time.time()
    counters = {"queries": len(queries), "shards": len(expected), "shards_skipped": len(set(expected) & done),
                "queries_pending": len(pending)}
    writer = ShardWriter(out, dict(expected), cfg.dump_maps)
    acs_seconds = gen_tokens = 0.0
    t_first = None
    if pending:
        if not ray.is_initialized():
            init_ray(cfg.address, ignore_reinit_error=True, log_to_driver=False,
                     runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                                               "TOKENIZERS_PARALLELISM": "false"}})
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = cfg.progress
        ctx.execution_options.preserve_order = False
        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus - cfg.actors * cfg.cpus_per_actor < 1:
            # Actors hold their CPUs for the whole run; with none left the decode tasks that feed
            # them can never be scheduled and the job hangs instead of failing.
            raise ValueError(f"{cfg.actors} actor(s) x {cfg.cpus_per_actor} CPU leave no CPU of the cluster's "
                             f"{cpus:g} for image loading; lower --actors or --cpus-per-actor")
        ground_cfg = GroundConfig(
            sampling=SamplingConfig(num_candidates=cfg.num_candidates, temperature=cfg.temperature, top_p=cfg.top_p,
                                    max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, decode=cfg.decode),
            capture=cfg.capture, profile_path=profile, regressor_path=regressor, grid=cfg.grid,
            keep_maps=cfg.dump_maps, adaptive=cfg.adaptive, adaptive_first=cfg.adaptive_first,
            adaptive_iou=cfg.adaptive_iou)
        # The listing rows are small (no image bytes); blocks of ~a batch keep all actors busy.
        ds = ray.data.from_items(pending, override_num_blocks=max(1, min(len(pending), len(pending) // cfg.batch_size)))
        # Half a CPU per decode task: a resource shape unlike the actor's, so Ray Data keeps decoding
        # in its own tasks (I/O never blocks the model) instead of fusing it into the actor.
        ds = ds.map_batches(load_images, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=0.5,
                            fn_kwargs={"storage_options": cfg.storage_options, "io_retries": cfg.io_retries,
                                       "io_backoff": cfg.io_backoff, "cache_key": cfg.run_id})
        ds = ds.map_batches(
            ACSStage, batch_size=cfg.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.actors),
            num_gpus=cfg.gpus_per_actor if gpus else 0, num_cpus=cfg.cpus_per_actor,
            fn_constructor_kwargs={"model": cfg.model, "ground_cfg": ground_cfg, "selector": selector,
                                   "run_id": cfg.run_id, "micro_batch": cfg.batch_size,
                                   "trust_remote_code": cfg.trust_remote_code, "dump_maps": cfg.dump_maps,
                                   "torch_threads": cfg.torch_threads or _auto_threads(cfg.actors)})
        labelled, t_log = 0, time.time()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if t_first is None:
                # Start-up: the actor process, its imports and model load, the executor's start;
                # the first batch's own compute is work, not start-up.
                t_first = time.time() - float(batch["acs_seconds"].sum())
            for i in range(len(batch["query_id"])):
                writer.add(batch["shard_id"][i], batch["box"][i], list(batch["candidates"][i]),
                           list(batch["attention"][i]))
            acs_seconds += float(batch["acs_seconds"].sum())
            gen_tokens += float(batch["generated_tokens"].sum())
            labelled += len(batch["query_id"])
            if cfg.log_every_s and time.time() - t_log >= cfg.log_every_s:
                t_log = time.time()
                print(progress_line(labelled, len(pending), len(writer.written), len(expected)), file=sys.stderr,
                      flush=True)
        if cfg.log_every_s:
            print(progress_line(labelled, len(pending), len(writer.written), len(expected)), file=sys.stderr,
                  flush=True)
    leftover = list(writer.buf)
    if leftover:
        raise RuntimeError(f"{len(leftover)} shard(s) did not receive all their rows: {leftover[:5]}")
    t_end = time.time()
    counters.update(shards_written=len(writer.written), shards_failed=len(writer.failed), status=dict(writer.status),
                    rows=dict(writer.rows), generated_tokens=gen_tokens, shards_open_max=writer.open_max)
    summary = {
        "run_id": cfg.run_id, "config": cfg.public(), "selector": selector, "profile": profile,
        "regressor": regressor, "source": source_key, "model_layout": _model_layout(cfg),
        "versions": _versions(), "counters": counters,
        "timings": {"list_s": t_listed - t_start, "total_s": t_end - t_start, "acs_actor_s": acs_seconds,
                    "startup_s": None if t_first is None else t_first - t_listed,
                    "queries_per_s": len(pending) / max(1e-9, t_end - t_listed) if pending else None},
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
        "failed_shards": dict(sorted(writer.failed.items())),
    }
    try:
        out.write_json(summary, "_runs", f"{cfg.run_id}.json")
    except OSError:
        if not writer.failed:
            raise
        # the store is failing: the shard failures below are the error to report
    if writer.failed:
        raise ShardsFailed(writer.failed, summary)
    return summary


def summary_text(summary: dict, out_url: str, storage_options: dict | None = None) -> str:
    """Counts by status and, with ground truth, the per-selector x bucket table of the whole output."""
    from .evaluate import load_tables, selector_rows
    from .metrics import format_table, selector_table

    c = summary["counters"]
    lines = [f"run {summary['run_id']}: {c['queries']} queries in {c['shards']} shard(s) "
             f"({c['shards_skipped']} already done, {c['shards_written']} written) in "
             f"{summary['timings']['total_s']:.1f} s"]
    if c.get("status"):
        lines.append("status: " + ", ".join(f"{k}={v}" for k, v in sorted(c["status"].items())))
    boxes, cands = load_tables(out_url, storage_options)
    if boxes.height and boxes["gt_x1"].null_count() < boxes.height:
        lines += ["", format_table(selector_table(selector_rows(boxes, cands)))]
    return "\n".join(lines)

