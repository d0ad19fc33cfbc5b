"""Candidate sampling with one prefill per query, and the teacher-forced capture pass.

`generate(num_return_sequences=N)` would repeat the prompt, and with it the vision tower and the
whole prefill, N times. Here the batch of prompts is prefilled once, the KV cache is repeated to
K = N + 1 rows per query (row 0 greedy, rows 1..N sampled), and a plain decode loop runs all rows
together. The prefix cache is kept for the capture pass, which feeds each candidate's own tokens
back in one forward and reads attention only where a box coordinate was generated.

Box-only decoding (`decode="box"`, the default): selection needs the four coordinates and nothing
else, so the answer's fixed opening (Qwen2.5-VL `[{"bbox_2d": [`) is part of the prompt
(`Adapter.encode(..., opening=True)`: prefilled once per query instead of sampled K times), each
row stops at the token that closes its box, and finished rows leave the decode batch.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .capture import CaptureRequest, capturing, install, pad_positions
from .models.base import Adapter, Encoded


DECODE_MODES = ("box", "full")


@dataclass
class SamplingConfig:
    num_candidates: int = 10  # sampled candidates N; the greedy one comes on top (cand_idx 0)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0
    # box: the opening is forced and a row stops when its box closes; full: rows decode the whole
    # answer until EOS (the label and the closing brackets too)
    decode: str = "box"

    def __post_init__(self):
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        if self.num_candidates < 0:
            raise ValueError(f"num_candidates must be >= 0 (0 = greedy only), got {self.num_candidates}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


@dataclass
class Prefill:
    """The prompt's forward for a batch of queries, once: what a later round of sampling for some
    of the same queries (adaptive K's second round) reuses instead of running the vision tower and
    the prefill again."""

    cache: DynamicCache  # the prompt's cache, one row per query
    logits: torch.Tensor  # (Q, m + 1, V): the last prompt position and the forced opening's m
    deltas: torch.Tensor  # (Q, 1): the rope offset the prefill computed (zeros without M-RoPE)

    def select(self, idx: list[int], keep: bool = True) -> "Prefill":
        """The queries `idx` (in that order). `keep`: as a copy, leaving this one as it is; else
        this one's cache is narrowed in place (a copy that will not be used again)."""
        cache = copy.deepcopy(self.cache) if keep else self.cache
        sel = torch.tensor(idx, dtype=torch.long, device=self.logits.device)
        cache.batch_select_indices(sel)
        return Prefill(cache, self.logits[sel], self.deltas[sel])


@dataclass
class Generation:
    """K rows per query, query-major: row q * K + k is candidate k of query q."""

    k: int
    tokens: list[list[int]]  # generated ids, EOS excluded (a box's closing token included)
    logprobs: list[list[float]]  # log p(token) under the model (temperature 1) per generated token
    cache: DynamicCache  # the prompt's cache, one row per query (capture_rows consumes it)
    mask: torch.Tensor  # (Q*K, P) prefix attention mask
    rope_deltas: torch.Tensor  # (Q*K, 1) position offset after the prompt (zeros without M-RoPE)
    n_generated: int  # decode steps over all rows (EOS counted; for cost accounting)
    decoded: list[int] | None = None  # per row: decode steps it took (EOS counted)
    # the prefill's logits and deltas beside `cache` (the same object: capture_rows consumes it, so
    # a round that reuses the prefill takes `prefill.select(...)` before the capture)
    prefill: Prefill | None = None


def query_seed(seed: int, key: str) -> int:
    """A stable per-query seed, so results do not depend on how queries are batched."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    from transformers.generation.logits_process import TopPLogitsWarper

    return TopPLogitsWarper(top_p=top_p)(None, logits)


@torch.inference_mode()
def sample(adapter: Adapter, enc: Encoded, cfg: SamplingConfig, query_keys: list[str],
           greedy: bool = True, prefill: Prefill | None = None) -> Generation:
    """K = N + 1 rows per query (row 0 greedy), or K = N sampled rows with `greedy=False`.

    With `cfg.decode == "box"` a row also ends at its first token that closes a box
    (`Adapter.box_close_ids`). When `enc` carries forced openings, the random draws that full
    decoding would have spent on the opening's tokens are spent here too, so a query's samples are
    the same as full decoding's whenever its rows would have written that opening themselves.

    With `prefill` (an earlier round's, `Prefill.select`-ed to these queries) the prompt is not run
    again; `enc` then needs only the token ids, mask and openings (`Encoded.select`)."""
    model = adapter.model
    k = cfg.num_candidates + (1 if greedy else 0)
    nq = len(query_keys)
    rows = nq * k
    openings = enc.openings or [[] for _ in range(nq)]
    m_max = max(len(o) for o in openings)
    # Prefill: vision tower + prompt, once. Logits only where they are used (the last position, and
    # the forced opening's for the draws below): the whole prompt's would be batch x prompt x vocab,
    # about 3 GB at batch 8 for Qwen2.5-VL-7B's 152k vocabulary.
    if prefill is None:
        out = model(**adapter.prefill_inputs(enc), use_cache=True, logits_to_keep=m_max + 1)
        prefill = Prefill(out.cache if hasattr(out, "cache") else out.past_key_values, out.logits,
                          adapter.rope_deltas(enc))  # the deltas are state the prefill just set
    prefix_cache = prefill.cache
    # The prompt's cache is kept for capture_rows; the decode loop extends (and compacts) a copy.
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(k)
    deltas = prefill.deltas.repeat_interleave(k, 0)
    prefix_mask = enc.inputs["attention_mask"].repeat_interleave(k, 0)
    logits = prefill.logits[:, -1].float().repeat_interleave(k, 0)  # (Q*K, V)
    temp = max(cfg.temperature, 1e-5)

    # Generators live on the logits' device so sampling never copies rows x vocab to the host.
    gens = [torch.Generator(device=logits.device).manual_seed(query_seed(cfg.seed, q)) for q in query_keys]
    for q, opening in enumerate(openings):
        for j in range(len(opening)):  # the draws full decoding makes for the opening's tokens
            probs = _filter_top_p(prefill.logits[q, j - len(opening) - 1].float() / temp, cfg.top_p).softmax(-1)
            torch.multinomial(probs.expand(k, -1), 1, generator=gens[q])
    dev = logits.device
    eos = torch.tensor(adapter.eos_token_ids, device=dev)
    stop = torch.cat([eos, torch.tensor(adapter.box_close_ids, dtype=eos.dtype, device=dev)]) \
        if cfg.decode == "box" else eos
    active = torch.arange(rows, device=dev)  # the original row of each row in the decode batch
    done = torch.zeros(rows, dtype=torch.bool, device=dev)
    ends = torch.full((rows,), cfg.max_new_tokens, dtype=torch.long, device=dev)  # real tokens per row
    n_dec = torch.full((rows,), cfg.max_new_tokens, dtype=torch.long, device=dev)  # decode steps per row
    is_greedy = ((torch.arange(rows, device=dev) % k) == 0) & greedy
    tokens = torch.full((rows, cfg.max_new_tokens), adapter.pad_token_id, dtype=torch.long, device=dev)
    logps = torch.zeros(rows, cfg.max_new_tokens, device=dev)
    mask, row_deltas = prefix_mask, deltas
    steps = 0
    for t in range(cfg.max_new_tokens):
        logp = logits.log_softmax(-1)
        probs = _filter_top_p(logits / temp, cfg.top_p).softmax(-1)
        if active.numel() < rows:
            # Rows that left still get a (discarded) draw, so every query's generator advances as in
            # a full batch and the remaining rows' samples do not depend on when others finished.
            full = probs.new_ones(rows, probs.shape[1])
            full[active] = probs
        else:
            full = probs
        # One generator per query keeps a query's samples identical whatever it is batched with.
        drawn = torch.cat([torch.multinomial(full[q * k:(q + 1) * k], 1, generator=gens[q])
                           for q in range(nq)]).squeeze(1)[active]
        nxt = torch.where(is_greedy[active], logits.argmax(-1), drawn)
        was_done = done[active]
        nxt = torch.where(was_done, torch.full_like(nxt, adapter.pad_token_id), nxt)
        tokens[active, t] = nxt
        logps[active, t] = logp.gather(1, nxt[:, None]).squeeze(1)
        finished = ~was_done & torch.isin(nxt, stop)
        # EOS is not part of the answer; a box's closing token is
        ends[active[finished]] = t + torch.isin(nxt[finished], eos, invert=True).long()
        n_dec[active[finished]] = t + 1
        done[active[finished]] = True
        steps = t + 1
        if bool(done.all()) or steps == cfg.max_new_tokens:
            break  # no forward for a token that will never be used
        left = done[active]
        if int(left.sum()) * 4 >= active.numel():
            # Finished rows leave once they are a quarter of the batch: each compaction copies the
            # KV cache, so doing it at every finish would cost more than the rows it saves.
            keep = (~left).nonzero().flatten()
            cache.batch_select_indices(keep)
            active, mask, row_deltas, nxt = active[keep], mask[keep], row_deltas[keep], nxt[keep]
        mask = torch.cat([mask, torch.ones(active.numel(), 1, dtype=mask.dtype, device=mask.device)], 1)
        step = model(input_ids=nxt[:, None], attention_mask=mask, cache=cache, use_cache=True,
                     position_ids=adapter.text_positions(mask, 1, row_deltas))
        logits = step.logits[:, -1].float()

    ends, decoded = ends.clamp(max=steps).tolist(), n_dec.clamp(max=steps).tolist()
    tok_lists = [tokens[r, :ends[r]].tolist() for r in range(rows)]
    lp_lists = [logps[r, :ends[r]].tolist() for r in range(rows)]
    return Generation(k=k, tokens=tok_lists, logprobs=lp_lists, cache=prefix_cache, mask=prefix_mask,
                      rope_deltas=deltas, n_generated=sum(decoded), decoded=decoded, prefill=prefill)


@torch.inference_mode()
def capture_rows(adapter: Adapter, enc: Encoded, gen: Generation, wanted: list[list[int]],
                 layers: list[int], heads: torch.Tensor | None = None, mass_rows: list[int] | None = None):
    """Attention onto the visual tokens from the steps that generated the `wanted` tokens.

    `wanted[r]` lists generated-token indices of row r. The step that generated token j had token
    j - 1 as its input (the last prompt token for j = 0), so we feed [last prompt token] + tokens
    against the prefix cache minus its last entry, and read input row j for token j.
    Returns per row a (len(wanted[r]), len(layers), H_sel, V_r) float32 tensor, or None if empty.
    With `mass_rows` (row ids) it also returns, as a second list, for those rows the visual share
    of the attention before renormalising, (len(wanted[r]), len(layers), H_sel), None elsewhere.
    """
    model = adapter.model
    install(model)
    rows = len(gen.tokens)
    need = [r for r in range(rows) if wanted[r]]
    if not need:
        return ([None] * rows, [None] * rows) if mass_rows is not None else [None] * rows
    device = gen.mask.device
    cache = gen.cache  # the prompt's, one row per query
    cache.crop(-1)  # keep the prompt minus its last token (crop takes tokens to remove, negative)
    cache.batch_select_indices(torch.tensor([r // gen.k for r in need], device=device))
    last = enc.inputs["input_ids"][:, -1].repeat_interleave(gen.k, 0)[need]
    t_max = max(max(wanted[r]) for r in need) + 1
    inp = torch.full((len(need), t_max), adapter.pad_token_id, dtype=torch.long, device=device)
    inp[:, 0] = last
    for i, r in enumerate(need):
        seq = gen.tokens[r][: t_max - 1]
        if seq:
            inp[i, 1:1 + len(seq)] = torch.tensor(seq, device=device)
    # Mask and positions cover the P - 1 cached prompt tokens plus the t_max fed ones; the prompt's
    # last token (fed again at input row 0) keeps its own position.
    mask = torch.cat([gen.mask[need],
                      torch.ones(len(need), t_max - 1, dtype=gen.mask.dtype, device=device)], 1)
    pos = adapter.text_positions(mask, t_max, gen.rope_deltas[need])
    r_max = max(len(wanted[r]) for r in need)
    row_idx = torch.zeros(len(need), r_max, dtype=torch.long, device=device)
    for i, r in enumerate(need):
        row_idx[i, : len(wanted[r])] = torch.tensor(wanted[r], device=device)
    vis = [enc.visual_positions[r // gen.k] for r in need]
    vis_pos, vis_valid = pad_positions(vis, device)
    # Key positions count from the first (padded) prompt position, as in the cache.
    slot = {r: i for i, r in enumerate(need)}
    m_need = [r for r in (mass_rows or []) if r in slot]
    m_idx = torch.tensor([slot[r] for r in m_need], dtype=torch.long, device=device)
    req = CaptureRequest(layers=list(layers), heads=heads, rows=row_idx, vis_pos=vis_pos, vis_valid=vis_valid,
                         mass_idx=m_idx if m_need else None, key_valid=mask[m_idx].bool() if m_need else None)
    with capturing(req):
        model(input_ids=inp, attention_mask=mask, cache=cache,
              use_cache=True, position_ids=pos, logits_to_keep=1)
    stacked = torch.stack([req.out[layer] for layer in layers], 2)  # (B', R, L, Hs, V)
    result: list[torch.Tensor | None] = [None] * rows
    for i, r in enumerate(need):
        result[r] = stacked[i, : len(wanted[r]), :, :, : vis[i].numel()]
    if mass_rows is None:
        return result
    masses: list[torch.Tensor | None] = [None] * rows
    if m_need:
        mass = torch.stack([req.mass[layer] for layer in layers], 2)  # (Bm, R, L, Hs)
        for j, r in enumerate(m_need):
            masses[r] = mass[j, : len(wanted[r])]
    return result, masses
