"""`acs check-model`: a preflight of a checkpoint before a long labelling job.

Everything a labelling run would discover only after Ray has started (or hours in), checked in
about the time it takes to load the model once:

    load            resolve and load offline exactly as `acs label` does (`load_adapter`)
    family          which adapter reads it, and how it writes boxes
    processor       tokenizer + image processor present; patch / merge (or tile) geometry agrees
                    with the model's vision config
    chat_template   the grounding prompt renders with one image placeholder, which the processor
                    expands into visual tokens
    special_tokens  image / vision-marker / EOS tokens exist as single tokens and the config's ids
                    are the tokenizer's
    box_round_trip  answer_text -> tokens -> decode -> the box parser gives the written box back,
                    and original pixels -> model coordinates -> original pixels within 1 px
    query           one real query on a generated scene through `Grounder` (N candidates, capture
                    on) and `rows_for_query`, the path `acs label`'s actors take
    memory          weights + KV cache + prefill logits + sampling buffers + captured attention for
                    the given N and batch size, from the config; the query's measured peak beside it

Each check is a plain function of a `_Ctx` returning a `Check`; checks whose prerequisites failed
are reported as `skip` instead of failing again with a less useful error. No check raises: a
preflight that dies with a stack trace is the failure it exists to prevent.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import asdict, dataclass, field

from .memory import PeakMemory, available_bytes

GIB = 1024**3

# The scene the query and the round trip run on (pipeline/organism/scenes.py): deterministic, with a
# known box, and at the geometry the organism and the Qwen tokens were designed for.
SCENE = ("shapes", "test", 0)


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip (not run: a prerequisite failed)
    detail: str
    data: dict = field(default_factory=dict)  # the values behind the detail, for --json and tests


@dataclass
class CheckReport:
    model: str
    num_candidates: int
    batch_size: int
    checks: list[Check] = field(default_factory=list)
    family: str | None = None
    path: str | None = None
    device: str | None = None
    dtype: str | None = None
    num_parameters: int | None = None
    parameter_bytes: int | None = None
    memory: dict = field(default_factory=dict)  # estimate terms and inputs, measured peak

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def verdict(self) -> str:
        if self.failed:
            return f"check-model: FAIL ({self.failed[0].name})"
        parts = [f"check-model: OK {self.family}"]
        if self.num_parameters is not None:
            parts.append(f"{_count(self.num_parameters)} parameters")
        if self.memory.get("total_bytes"):
            parts.append(f"~{_gib(self.memory['total_bytes'])} per batch of {self.batch_size} x "
                         f"{self.num_candidates + 1} candidates on {self.device}")
        warned = [c.name for c in self.checks if c.status == "warn"]
        line = ", ".join(parts)
        return line + (f" (warnings: {', '.join(warned)})" if warned else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(verdict=self.verdict(), exit_code=self.exit_code)
        return d


# ---------------------------------------------------------------------------------- memory model
def model_dims(adapter) -> dict:
    """The decoder dimensions the memory estimate needs, read from the model's config."""
    text = adapter.model.config.get_text_config()
    heads = text.num_attention_heads
    return {"layers": text.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
            "vocab": adapter.model.get_output_embeddings().weight.shape[0],
            "dtype_bytes": adapter.model.dtype.itemsize}


def estimate_memory(*, parameter_bytes: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                    vocab: int, dtype_bytes: int, prompt_tokens: int, visual_tokens: int,
                    new_tokens: int, coord_tokens: int, num_candidates: int, batch_size: int) -> dict:
    """Bytes one model batch of `batch_size` queries x (N + 1) candidates holds at its peak.

    Terms follow `pipeline.sampling` (one prefill per query, the cache repeated to K = N + 1 rows):
      kv_cache        K and V for every layer, all rows, prompt + generated tokens
      prefill_logits  the prefill forward's logits, last position only (`logits_to_keep=1`),
                      B x vocab in the model dtype
      sampling        per decode step logits, log-softmax, warped logits and probabilities, float32
      capture         per row and coordinate token, L x H x visual-token probabilities in float32,
                      held per layer and once more by the `torch.stack` in `capture_rows`
    Activations (the vision tower, the prefill's hidden states) are not counted: they are freed
    between layers and small beside the terms above for the model sizes this pipeline runs.
    """
    rows = batch_size * (num_candidates + 1)
    seq = prompt_tokens + new_tokens
    terms = {
        "weights": parameter_bytes,
        "kv_cache": layers * kv_heads * head_dim * 2 * dtype_bytes * seq * rows,
        "prefill_logits": batch_size * vocab * dtype_bytes,
        "sampling": rows * vocab * 4 * 4,
        "capture": rows * coord_tokens * layers * heads * visual_tokens * 4 * 2,
    }
    return {"terms": terms, "total_bytes": sum(terms.values())}


# ---------------------------------------------------------------------------------- loading
# What a model directory must hold for `load_adapter` (weights: safetensors only, as it loads them).
REQUIRED_FILES = (
    ("config.json", ("config.json",)),
    ("weights as *.safetensors", (".safetensors",)),
    ("a tokenizer (tokenizer.json or tokenizer_config.json)", ("tokenizer.json", "tokenizer_config.json")),
    ("an image processor config (processor_config.json or preprocessor_config.json)",
     ("processor_config.json", "preprocessor_config.json")),
)


def missing_model_files(path: str) -> list[str]:
    """What a local directory lacks to be a checkpoint `acs label` can load (empty: nothing)."""
    names = set(os.listdir(path))
    missing = []
    for what, options in REQUIRED_FILES:
        if not any(n == o or (o.startswith(".") and n.endswith(o)) for n in names for o in options):
            if what.startswith("weights") and any(n.endswith(".bin") for n in names):
                what += " (found *.bin: acs loads safetensors only; convert or re-download them)"
            missing.append(what)
    return missing


def hub_hint(model: str) -> str:
    return (f"pass a local directory, or pre-download it on a machine with network "
            f"(`hf download {model}`, or `huggingface-cli download {model}` with older clients; "
            f"`--local-dir DIR` to get a directory to pass instead) and set HF_HOME here to that cache")


def load_error(model: str, path: str, exc: BaseException) -> str:
    """One line saying why loading failed and what to do; never a stack trace."""
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)

    chain, e = [], exc
    while e is not None and not any(x is e for x in chain):  # transformers wraps the hub client's error in an OSError
        chain.append(e)
        e = e.__cause__ or e.__context__
    words = _first_line(exc)
    if os.path.isdir(path):
        return f"cannot load {path}: {words}"
    if any(isinstance(x, GatedRepoError) for x in chain):
        return (f"{model} is a gated hub repository: accept its licence on the hub and log in "
                f"(`hf auth login`) on a machine with network; {hub_hint(model)}")
    if any(isinstance(x, RepositoryNotFoundError) for x in chain):
        return f"the hub has no repository {model} (or it is private); {hub_hint(model)}"
    if any(isinstance(x, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for x in chain) \
            or isinstance(exc, OSError):
        from huggingface_hub import constants

        mode = "offline: HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the hub did not answer"
        return (f"{model} is not a local directory and is not in the Hugging Face cache "
                f"{constants.HF_HUB_CACHE} ({mode}); {hub_hint(model)}")
    return f"cannot load {model}: {words}"


# ---------------------------------------------------------------------------------- checks
@dataclass
class _Ctx:
    model: str
    num_candidates: int
    batch_size: int
    device: str | None
    dtype: str
    trust_remote_code: bool
    max_new_tokens: int
    report: CheckReport
    path: str | None = None
    adapter: object = None
    scene: object = None
    category: str = ""
    gt: tuple | None = None
    geometry: dict = field(default_factory=dict)
    coord_tokens: int = 0
    query_peak: PeakMemory | None = None
    _enc: object = None

    def encoded(self):
        """The scene's prompt through the adapter, once (round trip and memory share it)."""
        if self._enc is None:
            self._enc = self.adapter.encode([self.scene.image], [self.category])
        return self._enc


def check_load(ctx: _Ctx) -> Check:
    import torch
    from huggingface_hub import constants

    from .models.base import load_adapter, resolve_model

    try:
        path = resolve_model(ctx.model)
    except FileNotFoundError as e:  # a local path that does not exist, or the untrained organism
        return Check("load", "fail", str(e))
    ctx.path = ctx.report.path = path
    if os.path.isdir(path):
        missing = missing_model_files(path)
        if missing:
            return Check("load", "fail", f"{path} is not a model directory: missing " + "; ".join(missing),
                         {"missing": missing})
    t0 = time.perf_counter()
    try:
        ctx.adapter = ad = load_adapter(ctx.model, device=ctx.device, dtype=ctx.dtype,
                                        trust_remote_code=ctx.trust_remote_code)
    except (OSError, ValueError, ImportError) as e:  # hub/cache errors are OSErrors; unknown families ValueErrors
        return Check("load", "fail", load_error(ctx.model, path, e))
    seconds = time.perf_counter() - t0
    params = list(ad.model.parameters())
    n = sum(p.numel() for p in params)
    nbytes = sum(p.numel() * p.element_size() for p in params) + \
        sum(b.numel() * b.element_size() for b in ad.model.buffers())
    r = ctx.report
    r.num_parameters, r.parameter_bytes = n, nbytes
    r.device, r.dtype = str(ad.model.device), str(ad.model.dtype).replace("torch.", "")
    where = "local directory" if os.path.isdir(path) else "hub cache"
    mode = "offline" if constants.HF_HUB_OFFLINE else "online"
    return Check("load", "ok", f"{path} ({where}, {mode}) in {seconds:.1f} s: {_count(n)} parameters, "
                 f"{_gib(nbytes)} {r.dtype} on {r.device}",
                 {"path": path, "seconds": seconds, "parameters": n, "parameter_bytes": nbytes,
                  "dtype": r.dtype, "device": r.device, "offline": bool(constants.HF_HUB_OFFLINE),
                  "cuda_available": torch.cuda.is_available()})


def check_family(ctx: _Ctx) -> Check:
    import json

    ad = ctx.adapter
    ctx.report.family = ad.family
    cfg = ad.model.config
    data = {"family": ad.family, "model_type": cfg.model_type, "architecture": type(ad.model).__name__,
            **ad.layout_info(), "model_id": ad.model_id}
    detail = (f"{ad.family} ({cfg.model_type}, {type(ad.model).__name__}): boxes in {ad.coord_system} "
              f"coordinates, capture over {ad.visual_layout} visual tokens")
    meta = os.path.join(ctx.path, "acs_model.json")
    if os.path.isfile(meta):  # written by make-tiny-model / train-organism; a mismatch means a moved file
        with open(meta) as f:
            said = json.load(f).get("family")
        if said and said != ad.family:
            return Check("family", "warn", detail + f"; but acs_model.json says {said!r}", data)
    return Check("family", "ok", detail, data)


def check_processor(ctx: _Ctx) -> Check:
    ad = ctx.adapter
    proc = ad.processor
    ip = getattr(proc, "image_processor", None)
    if getattr(proc, "tokenizer", None) is None or ip is None:
        return Check("processor", "fail", f"{type(proc).__name__} lacks a tokenizer or an image processor: "
                     "the checkpoint's processor files are incomplete")
    vcfg = ad.model.config.vision_config
    problems = []
    if getattr(ip, "merge_size", None):
        # Qwen-style: patches merged m x m into one token, the image resized to a multiple of patch * m.
        patch, merge = int(ip.patch_size), int(ip.merge_size)
        for name, have, want in (("patch_size", patch, vcfg.patch_size),
                                 ("merge_size", merge, getattr(vcfg, "spatial_merge_size", merge))):
            if have != want:
                problems.append(f"image processor {name}={have} but the vision config has {want}")
        token_px = patch * merge
        max_pixels = _size_get(ip.size, "longest_edge") or getattr(ip, "max_pixels", None)
        min_pixels = _size_get(ip.size, "shortest_edge") or getattr(ip, "min_pixels", None)
        max_tokens = int(max_pixels) // token_px**2
        geo = {"kind": "merged patches", "patch_size": patch, "merge_size": merge, "token_px": token_px,
               "min_pixels": min_pixels, "max_pixels": max_pixels, "max_visual_tokens": max_tokens}
        detail = (f"{type(ip).__name__}: {patch}-px patches merged {merge}x{merge} ({token_px}-px visual tokens), "
                  f"{min_pixels}..{max_pixels} px per image, at most {max_tokens} visual tokens")
    elif hasattr(proc, "image_seq_length") and hasattr(ip, "max_patches"):
        # InternVL-style: square tiles, each (tile / patch * downsample)^2 tokens, plus a thumbnail.
        tile = int(_size_get(ip.size, "height"))
        patch = vcfg.patch_size[0] if isinstance(vcfg.patch_size, (list, tuple)) else vcfg.patch_size
        per_view = int(proc.image_seq_length)
        cfg = ad.model.config
        expect = int(tile // patch * getattr(cfg, "downsample_ratio", 0.5)) ** 2
        if per_view != getattr(cfg, "image_seq_length", per_view):
            problems.append(f"processor image_seq_length={per_view} but the config has {cfg.image_seq_length}")
        if per_view != expect:
            problems.append(f"{tile}-px tiles of {patch}-px patches give {expect} tokens, "
                            f"but image_seq_length is {per_view}")
        views = int(ip.max_patches) + (1 if int(ip.max_patches) > 1 else 0)
        geo = {"kind": "tiles", "tile": tile, "patch_size": patch, "tokens_per_view": per_view,
               "min_tiles": int(ip.min_patches), "max_tiles": int(ip.max_patches),
               "max_visual_tokens": views * per_view}
        detail = (f"{type(ip).__name__}: {tile}-px tiles of {patch}-px patches, {per_view} tokens per view, "
                  f"{ip.min_patches}..{ip.max_patches} tiles + thumbnail, at most {views * per_view} visual tokens")
    else:
        return Check("processor", "warn", f"{type(ip).__name__}: a geometry this check does not know; "
                     "the query below still runs it")
    ctx.geometry = geo
    if problems:
        return Check("processor", "fail", "; ".join(problems), geo)
    return Check("processor", "ok", detail, geo)


def check_chat_template(ctx: _Ctx) -> Check:
    ad = ctx.adapter
    proc = ad.processor
    if not getattr(proc, "chat_template", None):
        return Check("chat_template", "fail", "the processor has no chat template (chat_template.jinja or "
                     "chat_template.json missing from the checkpoint); every prompt is rendered with it")
    text = proc.apply_chat_template(ad.messages(ctx.category), add_generation_prompt=True, tokenize=False)
    image_token = proc.image_token
    data = {"rendered": text, "image_token": image_token, "placeholders": text.count(image_token)}
    if data["placeholders"] != 1:
        return Check("chat_template", "fail", f"the template renders {data['placeholders']} {image_token} "
                     "placeholders for one image (expected 1)", data)
    if ad.prompt(ctx.category) not in text:
        return Check("chat_template", "fail", "the rendered template does not contain the grounding prompt "
                     f"{ad.prompt(ctx.category)!r}", data)
    ids = proc(text=[text], images=[ctx.scene.image], return_tensors="pt")["input_ids"][0]
    data.update(prompt_tokens=int(ids.numel()), visual_tokens=int((ids == proc.image_token_id).sum()))
    if data["visual_tokens"] == 0:
        return Check("chat_template", "fail", f"the processor did not expand {image_token} into visual tokens", data)
    return Check("chat_template", "ok", f"grounding prompt with one {image_token} placeholder, expanded to "
                 f"{data['visual_tokens']} visual tokens of {data['prompt_tokens']} on a "
                 f"{ctx.scene.image.width}x{ctx.scene.image.height} image", data)


# Markers a family's prompt puts around an image, besides the image token the processor names
# (config attribute that must hold its id, or None where the config keeps no id for it).
IMAGE_MARKERS = {
    "qwen2.5-vl": (("<|vision_start|>", "vision_start_token_id"), ("<|vision_end|>", "vision_end_token_id")),
    "qwen3-vl": (("<|vision_start|>", "vision_start_token_id"), ("<|vision_end|>", "vision_end_token_id")),
    "internvl3.5": (("<img>", None), ("</img>", None)),
}


def check_special_tokens(ctx: _Ctx) -> Check:
    ad = ctx.adapter
    tok, cfg = ad.tokenizer, ad.model.config
    rows = ad.model.get_input_embeddings().num_embeddings
    wanted = ((ad.processor.image_token, "image_token_id"),) + IMAGE_MARKERS.get(ad.family, ())
    problems, warns, found = [], [], {}
    for token, attr in wanted:
        tid = tok.convert_tokens_to_ids(token)
        if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id) \
                or tok.encode(token, add_special_tokens=False) != [tid]:
            problems.append(f"the tokenizer lacks {token} as one token")
            continue
        found[token] = tid
        if tid >= rows:
            problems.append(f"{token}={tid} is beyond the model's {rows} embedding rows")
        have = getattr(cfg, attr, None) if attr else None
        if attr and have != tid:
            problems.append(f"config {attr}={have} but the tokenizer's {token} is {tid}: the model would look "
                            "for the image at other tokens than the processor writes")
    eos = ad.eos_token_ids
    if not eos or any(e is None for e in eos):
        problems.append("generation_config has no eos_token_id: sampling could not stop before max_new_tokens")
    else:
        bad = [e for e in eos if not 0 <= e < rows]
        if bad:
            problems.append(f"eos id(s) {bad} are outside the model's {rows} embedding rows")
        if tok.eos_token_id is not None and tok.eos_token_id not in eos:
            warns.append(f"the tokenizer's eos {tok.eos_token}={tok.eos_token_id} is not among the model's eos "
                         f"ids {eos}: answers may run to max_new_tokens")
    if len(tok) > rows:
        warns.append(f"the tokenizer has {len(tok)} tokens but the model {rows} embedding rows")
    eos_names = [tok.convert_ids_to_tokens(e) if e is not None and 0 <= e < len(tok) else None for e in eos]
    data = {"tokens": found, "eos_token_ids": eos, "eos_tokens": eos_names, "embedding_rows": rows,
            "tokenizer_size": len(tok)}
    if problems:
        return Check("special_tokens", "fail", "; ".join(problems), data)
    detail = ", ".join(f"{t}={i}" for t, i in found.items()) + f"; eos {dict(zip(eos_names, eos))}; config ids match"
    return Check("special_tokens", "warn" if warns else "ok", "; ".join([detail] + warns), data)


def check_box_round_trip(ctx: _Ctx) -> Check:
    from .boxes import find_box

    ad = ctx.adapter
    enc = ctx.encoded()
    isz, osz = enc.input_sizes[0], enc.orig_sizes[0]
    box = ctx.gt
    written = ad.from_original(box, isz, osz)
    text = ad.answer_text(written, ctx.category)
    ints = [float(int(round(v))) for v in written]  # answer_text writes integers
    ids = ad.tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = ad.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    raw = find_box(decoded)
    _, parsed = ad.parse(ids, isz, osz)  # generated tokens reach parse without EOS, as here
    data = {"box": list(box), "input_size": list(isz), "orig_size": list(osz), "written": ints, "text": text,
            "decoded": decoded, "parsed": list(raw.values) if raw else None,
            "box_back": list(parsed.box) if parsed.box else None, "tokens": len(ids),
            "coord_tokens": [len(t) for t in parsed.coord_tokens]}
    problems = []
    if decoded != text:
        problems.append(f"the tokenizer does not give the answer back: {text!r} -> {decoded!r}")
    if raw is None or list(raw.values) != ints:
        problems.append(f"the box parser read {data['parsed']} from {decoded!r}, {ints} was written")
    if parsed.box is None:
        problems.append(f"parse found no box: {parsed.error}")
    else:
        err = max(abs(a - b) for a, b in zip(parsed.box, box))
        data["max_error_px"] = err
        if err > 1.0:
            problems.append(f"original -> model -> original moves the box by {err:.2f} px (> 1 px)")
        if len(parsed.coord_tokens) != 4 or not all(parsed.coord_tokens):
            problems.append("some coordinate maps to no token: capture would have nothing to read for it")
    if problems:
        return Check("box_round_trip", "fail", "; ".join(problems), data)
    ctx.coord_tokens = len({i for span in parsed.coord_tokens for i in span})
    shown = ", ".join(f"{v:g}" for v in box)
    return Check("box_round_trip", "ok", f"({shown}) px -> {text!r} ({len(ids)} tokens, {ctx.coord_tokens} for "
                 f"the coordinates) -> ({', '.join(f'{v:.1f}' for v in parsed.box)}) px, "
                 f"max error {data['max_error_px']:.2f} px", data)


def check_query(ctx: _Ctx) -> Check:
    import pyarrow as pa

    from .assets import default_paths, default_temperature
    from .ground import GroundConfig, Grounder, Query
    from .label import LabelConfig, resolve_selector
    from .records import rows_for_query
    from .sampling import SamplingConfig
    from .schema import BOXES_SCHEMA, CANDIDATES_SCHEMA, attention_schema

    # The ground configuration `run_label` builds from the same LabelConfig fields and defaults.
    cfg = LabelConfig(output="-", model=ctx.model, num_candidates=ctx.num_candidates, batch_size=ctx.batch_size,
                      max_new_tokens=ctx.max_new_tokens)
    cfg.temperature = default_temperature(cfg.model, cfg.temperature)
    profile, regressor = default_paths(cfg.model, cfg.profile, cfg.regressor)
    selector = resolve_selector(cfg, regressor)
    ground_cfg = GroundConfig(
        sampling=SamplingConfig(num_candidates=cfg.num_candidates, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, decode=cfg.decode),
        capture=cfg.capture, profile_path=profile, regressor_path=regressor, grid=cfg.grid,
        keep_maps=cfg.dump_maps)
    ad = ctx.adapter
    img = ctx.scene.image
    query = Query("check-model", img, ctx.category, ctx.gt)
    t0 = time.perf_counter()
    try:
        grounder = Grounder(ad, ground_cfg)
        with PeakMemory(str(ad.model.device)) as peak:
            result = grounder.ground([query])[0]
    except Exception as e:  # noqa: BLE001 - a crash of the query is this check's finding
        return Check("query", "fail", f"the query crashed: {_describe(e)}")
    seconds = time.perf_counter() - t0
    ctx.query_peak = peak
    k = ctx.num_candidates + 1
    meta = {"query_id": query.query_id, "image_id": "scene", "image_uri": None, "category": ctx.category,
            "width": img.width, "height": img.height, "shard_id": "check-model",
            **dict(zip(("gt_x1", "gt_y1", "gt_x2", "gt_y2"), ctx.gt))}
    box_row, cand_rows, attn_rows = rows_for_query(meta, result, selector=selector, k=k, run_id="check-model",
                                                   model_id=ad.model_id)
    # The tables ShardWriter writes: a row that does not fit its schema would fail the shard.
    try:
        pa.Table.from_pylist([box_row], schema=BOXES_SCHEMA)
        pa.Table.from_pylist(cand_rows, schema=CANDIDATES_SCHEMA)
        pa.Table.from_pylist(attn_rows, schema=attention_schema(cfg.dump_maps))
    except (pa.ArrowException, TypeError, ValueError) as e:
        return Check("query", "fail", f"the result rows do not fit the output schema: {_describe(e)}")
    n_box = sum(c.status == "ok" for c in result.candidates)
    data = {"seconds": seconds, "status": result.status, "error": result.error, "selector": selector,
            "candidates": len(result.candidates), "with_box": n_box, "candidate_rows": len(cand_rows),
            "attention_rows": len(attn_rows), "selected_box": [box_row[c] for c in ("x1", "y1", "x2", "y2")],
            "iou": box_row["iou"], "generated_tokens": result.timings.get("generated_tokens"),
            "peak_bytes": peak.delta, "peak_method": peak.method, "scores": sorted(result.selected),
            "captured_layers": list(grounder.layers), "captured_heads": list(grounder.heads)}
    if result.status not in ("ok", "no_box"):
        return Check("query", "fail", f"query status {result.status}: {result.error}", data)
    if len(result.candidates) != k or len(cand_rows) != k:
        return Check("query", "fail", f"{len(result.candidates)} candidates came back, {k} expected", data)
    timing = f"{seconds:.1f} s for {k} candidates on a {img.width}x{img.height} scene ({ctx.category!r})"
    if n_box == 0:
        return Check("query", "warn", f"{timing}; no candidate wrote a box (expected of random weights; a "
                     "trained checkpoint doing this has a prompt or box-format problem)", data)
    iou = "" if box_row["iou"] is None else f", IoU {box_row['iou']:.2f} with the scene's box"
    return Check("query", "ok", f"{timing}; {n_box}/{k} candidates with a box, rows well-formed, "
                 f"{selector} selected candidate {box_row['cand_idx']}{iou}", data)


def check_memory(ctx: _Ctx) -> Check:
    ad = ctx.adapter
    enc = ctx.encoded()
    ids = enc.inputs["input_ids"][0][enc.inputs["attention_mask"][0] == 1]
    visual = int((ids == ad.processor.image_token_id).sum())
    text_tokens = int(ids.numel()) - visual
    max_visual = int(ctx.geometry.get("max_visual_tokens") or visual)
    inputs = {"parameter_bytes": ctx.report.parameter_bytes, **model_dims(ad),
              "prompt_tokens": text_tokens + max_visual, "visual_tokens": max_visual,
              "new_tokens": ctx.max_new_tokens, "coord_tokens": max(4, ctx.coord_tokens),
              "num_candidates": ctx.num_candidates, "batch_size": ctx.batch_size}
    est = estimate_memory(**inputs)
    # The same model at the scene's size: per batch (the processor's largest image is the bound, a
    # job on smaller images needs less), and for what the query just ran (batch 1) beside its peak.
    scene = {**inputs, "prompt_tokens": int(ids.numel()), "visual_tokens": visual}
    this = estimate_memory(**{**scene, "batch_size": 1})
    mem = {**est, "inputs": inputs, "scene_batch_bytes": estimate_memory(**scene)["total_bytes"],
           "query_estimate_bytes": this["total_bytes"] - this["terms"]["weights"]}
    peak = ctx.query_peak
    if peak is not None:
        mem.update(measured_query_bytes=peak.delta, measured_method=peak.method)
    ctx.report.memory = mem
    t = est["terms"]
    detail = (f"{_gib(est['total_bytes'])} per batch of {ctx.batch_size} x {ctx.num_candidates + 1} "
              f"candidates at the processor's largest image ({max_visual} visual tokens): weights "
              f"{_gib(t['weights'])}, KV cache {_gib(t['kv_cache'])}, prefill logits "
              f"{_gib(t['prefill_logits'])}, sampling {_gib(t['sampling'])}, capture {_gib(t['capture'])}")
    detail += f"; {_gib(mem['scene_batch_bytes'])} at the scene's {visual} visual tokens"
    if peak is not None:
        detail += (f"; the one query: estimated {_gib(mem['query_estimate_bytes'])}, measured "
                   f"{_gib(peak.delta)} above the loaded model ({peak.method})")
    free = available_bytes(str(ad.model.device))
    mem["available_bytes"] = free
    need = est["total_bytes"] - t["weights"]  # the weights are loaded already
    if free is not None and need > free:
        return Check("memory", "warn", detail + f"; more than the {_gib(free)} available now: lower "
                     "--batch-size or --num-candidates, or cap the processor's max_pixels", mem)
    return Check("memory", "ok", detail, mem)


STEPS = (  # name, function, checks it needs to have passed (ok or warn)
    ("load", check_load, ()),
    ("family", check_family, ("load",)),
    ("processor", check_processor, ("load",)),
    ("chat_template", check_chat_template, ("load",)),
    ("special_tokens", check_special_tokens, ("load",)),
    ("box_round_trip", check_box_round_trip, ("chat_template", "special_tokens")),
    ("query", check_query, ("chat_template", "special_tokens")),
    ("memory", check_memory, ("processor", "box_round_trip")),
)


def check_model(model: str, num_candidates: int = 10, batch_size: int = 8, device: str | None = None,
                dtype: str = "auto", trust_remote_code: bool = False, max_new_tokens: int = 48) -> CheckReport:
    """Run every preflight check of `model` (hub id, local directory or `organism`).

    Raises ValueError only for invalid arguments (a usage error); everything about the model
    itself becomes a check row.
    """
    from .organism.scenes import make_scene
    from .sampling import SamplingConfig

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"dtype must be one of auto, bf16, fp16, fp32, got {dtype!r}")
    SamplingConfig(num_candidates=num_candidates, max_new_tokens=max_new_tokens)  # its own argument checks
    report = CheckReport(model=model, num_candidates=num_candidates, batch_size=batch_size)
    ctx = _Ctx(model, num_candidates, batch_size, device, dtype, trust_remote_code, max_new_tokens, report)
    ctx.scene = make_scene(*SCENE)
    ctx.category, obj = ctx.scene.queries()[0]
    x, y, w, h = obj.bbox
    ctx.gt = (x, y, x + w, y + h)
    passed: dict[str, str] = {}
    root: dict[str, str] = {}  # skipped check -> the failed check it waits on (skips are transitive)
    for name, fn, needs in STEPS:
        blocked = [n for n in needs if passed.get(n) not in ("ok", "warn")]
        if blocked:
            root[name] = root.get(blocked[0], blocked[0])
            c = Check(name, "skip", f"not run: {root[name]} failed")
        else:
            try:
                c = fn(ctx)
            except Exception as e:  # noqa: BLE001 - an unexpected error is a failed check, never a traceback
                c = Check(name, "fail", _describe(e))
        passed[name] = c.status
        report.checks.append(c)
    return report


# ---------------------------------------------------------------------------------- helpers
def _size_get(size, key):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _describe(e: BaseException) -> str:
    """`Type: first line (at file:line)`: where it broke, without a stack trace."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {os.path.relpath(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {_first_line(e)}{where}"


def _gib(n: float) -> str:
    return f"{n / GIB:.3g} GiB"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def format_report(report: CheckReport) -> str:
    """One line per check, then the verdict."""
    width = max(len(c.name) for c in report.checks) if report.checks else 0
    lines = [f"{c.status.upper():<4}  {c.name:<{width}}  {c.detail}" for c in report.checks]
    return "\n".join(lines + [report.verdict()])
