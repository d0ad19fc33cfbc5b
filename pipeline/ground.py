"""The per-query ACS core: a batch of queries in, every candidate with every score out.

    encode (adapter) -> sample K = N+1 candidates (sampling) -> parse boxes (adapter)
    -> capture coordinate-token attention (sampling.capture_rows) -> reduce maps to entropy,
    pooled grid and in-box mass -> score with every selector (scoring) -> QueryResult

With `capture="all"` the capture also reads the prompt's last token (input row 0 of each query's
first row: the step that generates the answer's first token), with the share of its attention on
the image: the localization-heads baseline and its calibration read that, not the candidates.

Plain Python and torch, no Ray: the Ray stage wraps `Grounder.ground` and `acs ground` calls it
directly. Per-query failures become a status and an error on that query, never an exception.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .capture import entropy
from .metrics import box_iou
from .models.base import Adapter
from .sampling import SamplingConfig, capture_rows, query_seed, sample
from .scoring import (HeadProfile, QueryArrays, middle_band, score_acs_free, score_greedy, score_loc_heads,
                      score_logprob, score_loc_mass, score_oracle, score_random, score_vote, select,
                      spatial_entropy)

CAPTURE_MODES = ("all", "profile", "none")


@dataclass
class GroundConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    capture: str = "all"  # all: every layer and head; profile: only ACS-Free heads; none
    profile_path: str | None = None
    regressor_path: str | None = None
    grid: int = 16  # pooled map size for ACS-Learned and --dump-maps
    keep_maps: bool = False  # keep pooled maps on the result (regressor training, reports)
    adaptive: bool = False  # adaptive K: stop after round 1 when its candidates agree
    adaptive_first: int = 4  # sampled candidates in round 1 (plus greedy)
    adaptive_iou: float = 0.7  # agreement: every pair of round-1 boxes has at least this IoU


@dataclass
class Query:
    query_id: str
    image: object  # PIL.Image, RGB
    category: str
    gt: tuple[float, float, float, float] | None = None  # xyxy, original pixels


@dataclass
class Candidate:
    cand_idx: int
    text: str
    status: str  # ok | no_box
    error: str | None
    box: tuple[float, float, float, float] | None
    box_fixed: bool
    mean_logprob: float
    n_tokens: int
    scores: dict[str, float] = field(default_factory=dict)
    iou: float | None = None
    entropy: np.ndarray | None = None  # (4, L, H) over captured layers/heads
    pooled: np.ndarray | None = None  # (4, L, H, G, G)


@dataclass
class QueryResult:
    query_id: str
    status: str
    error: str | None
    candidates: list[Candidate]
    selected: dict[str, int | None]
    grid_hw: tuple[int, int] | None = None
    layers: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # The prompt's last token, per captured (layer, head): visual share of its attention and the
    # spatial entropy of its map (capture "all" only; the loc-heads calibration reads them).
    prompt_mass: np.ndarray | None = None
    prompt_spatial_entropy: np.ndarray | None = None


class Grounder:
    """Holds the adapter and the selectors' state (head profile, regressor) for many batches."""

    def __init__(self, adapter: Adapter, cfg: GroundConfig | None = None):
        self.adapter = adapter
        self.cfg = cfg or GroundConfig()
        if self.cfg.capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {self.cfg.capture!r}")
        nl, nh = adapter.num_layers, adapter.num_heads
        self.profile = (HeadProfile.load(self.cfg.profile_path, nl, nh) if self.cfg.profile_path
                        else HeadProfile.default(adapter.model_id, nl, nh))
        self.regressor = None
        if self.cfg.regressor_path:
            from .regressor import load_regressor

            self.regressor, _ = load_regressor(self.cfg.regressor_path, nl, nh)
        if self.cfg.capture == "all" or self.regressor is not None:
            self.layers, self.heads = list(range(nl)), list(range(nh))
        elif self.cfg.capture == "profile":
            self.layers = self.profile.layers
            self.heads = sorted({h for _, h in self.profile.heads})
        else:
            self.layers, self.heads = [], []

    def ground(self, queries: list[Query]) -> list[QueryResult]:
        """Results in the order of `queries`; unusable query texts fail alone (`query_error`)."""
        bad = {i: self.adapter.check_query(q.category) for i, q in enumerate(queries)}
        bad = {i: e for i, e in bad.items() if e}
        good = [q for i, q in enumerate(queries) if i not in bad]
        done = iter(self._ground(good) if good else [])
        return [QueryResult(q.query_id, "query_error", bad[i], [], {}) if i in bad else next(done)
                for i, q in enumerate(queries)]

    def _ground(self, queries: list[Query]) -> list[QueryResult]:
        cfg = self.cfg
        n = cfg.sampling.num_candidates
        timing = {"encode_s": 0.0, "sample_s": 0.0, "capture_s": 0.0}
        if cfg.adaptive and 0 < cfg.adaptive_first < n:
            # Round 1: greedy + m samples. Queries whose candidates already agree stop there (large,
            # easy objects); the others get the remaining N - m samples in round 2.
            first = replace(cfg.sampling, num_candidates=cfg.adaptive_first)
            kept = []  # round 1's prefill, taken before its capture consumes the prompt cache
            cands, maps, tokens, enc, prompts = self._round(queries, first, True, "", timing, keep=kept)
            todo = [i for i, cs in enumerate(cands) if not _agree(cs, cfg.adaptive_iou)]
            if todo:
                # Round 2 samples on round 1's prefill: the image and the prompt are not run again.
                rest = replace(cfg.sampling, num_candidates=n - cfg.adaptive_first)
                c2, m2, t2, _, _ = self._round([queries[i] for i in todo], rest, False, "#round2", timing,
                                            first_idx=cfg.adaptive_first + 1,
                                            reuse=(enc.select(todo), kept[0].select(todo, keep=False)))
                for j, i in enumerate(todo):
                    cands[i] += c2[j]
                    maps[i] += m2[j]
                    tokens[i] += t2[j]
            for i, cs in enumerate(cands):
                for c in range(len(cs), n + 1):  # keep N+1 rows per query: status says why
                    cs.append(Candidate(c, None, "skipped", "not sampled: the first candidates agreed (adaptive K)",
                                        None, False, float("nan"), 0))
                    maps[i].append(None)
        else:
            cands, maps, tokens, enc, prompts = self._round(queries, cfg.sampling, True, "", timing)
        t3 = time.perf_counter()
        results = [self._query_result(q, cands[qi], maps[qi], enc.grids[qi], enc.orig_sizes[qi], prompts[qi])
                   for qi, q in enumerate(queries)]
        timing["score_s"] = time.perf_counter() - t3
        for res, toks in zip(results, tokens):
            res.timings = {k_: v / len(queries) for k_, v in timing.items()}
            res.timings["generated_tokens"] = toks
        return results

    def _round(self, queries, sampling: SamplingConfig, greedy: bool, salt: str, timing: dict, first_idx: int = 0,
               keep: list | None = None, reuse: tuple | None = None):
        """Sample, parse and capture one round; per query: candidates, full maps, generated tokens,
        and (capture "all", first round) the prompt's last token: (maps (L, H, gh, gw), mass (L, H)).
        `keep` (a list) receives a copy of the round's `Prefill`; `reuse` = (Encoded, Prefill) of
        these queries from an earlier round, which then is not encoded or prefilled again."""
        ad = self.adapter
        t0 = time.perf_counter()
        if reuse is None:
            enc, prefill = ad.encode([q.image for q in queries], [q.category for q in queries],
                                     opening=sampling.decode == "box"), None
        else:
            enc, prefill = reuse
        t1 = time.perf_counter()
        gen = sample(ad, enc, sampling, [q.query_id + salt for q in queries], greedy=greedy, prefill=prefill)
        if keep is not None:
            keep.append(gen.prefill.select(list(range(len(queries)))))
        t2 = time.perf_counter()
        k = gen.k
        opens = enc.opening_texts or [""] * len(queries)
        parsed = [ad.parse(toks, enc.input_sizes[r // k], enc.orig_sizes[r // k], opens[r // k])
                  for r, toks in enumerate(gen.tokens)]
        wanted = [sorted({i for span in p.coord_tokens for i in span}) if p.box is not None else []
                  for _, p in parsed]
        maps = [None] * len(parsed)
        prompt = greedy and self.cfg.capture == "all"
        # Row 0 of the capture input is the prompt's last token; the first row of each query reads it
        # (in box mode it is also x1's first token, so this costs nothing there).
        captured = [sorted({0, *w}) if prompt and r % k == 0 else w for r, w in enumerate(wanted)]
        masses = [None] * len(parsed)
        if self.layers:
            head_idx = torch.tensor(self.heads, device=ad.model.device)
            if prompt:
                maps, masses = capture_rows(ad, enc, gen, captured, self.layers, head_idx,
                                            mass_rows=list(range(0, len(parsed), k)))
            else:
                maps = capture_rows(ad, enc, gen, captured, self.layers, head_idx)
        t3 = time.perf_counter()
        timing["encode_s"] += t1 - t0
        timing["sample_s"] += t2 - t1
        timing["capture_s"] += t3 - t2
        out_c, out_m, out_t, out_p = [], [], [], []
        for qi in range(len(queries)):
            gh, gw = enc.grids[qi]
            r0 = qi * k
            out_p.append((maps[r0][0].reshape(len(self.layers), len(self.heads), gh, gw).numpy(),
                          masses[r0][0].numpy()) if prompt and maps[r0] is not None else None)
            cs, ms = [], []
            for c in range(k):
                r = qi * k + c
                cand, m = self._candidate(first_idx + c, parsed[r], gen.tokens[r], gen.logprobs[r], wanted[r],
                                          captured[r], maps[r], gh, gw)
                cs.append(cand)
                ms.append(m)
            out_c.append(cs)
            out_m.append(ms)
            out_t.append(sum(gen.decoded[qi * k:(qi + 1) * k]))
        return out_c, out_m, out_t, enc, out_p

    def _candidate(self, idx, parsed, tokens, logprobs, wanted, captured, rows, gh, gw):
        text, p = parsed
        coord_lp = [logprobs[i] for i in wanted if i < len(logprobs)]
        cand = Candidate(cand_idx=idx, text=text, status="ok" if p.box is not None else "no_box", error=p.error,
                         box=p.box, box_fixed=p.box_fixed,
                         mean_logprob=float(np.mean(coord_lp)) if coord_lp else float("nan"), n_tokens=len(tokens))
        if rows is None or p.box is None:
            return cand, None
        # Rows -> the 4 coordinates: a coordinate spelled by several tokens averages them.
        pos = {tok: j for j, tok in enumerate(captured)}
        m = torch.stack([rows[[pos[t] for t in span]].mean(0) for span in p.coord_tokens])
        m = m.reshape(4, len(self.layers), len(self.heads), gh, gw)  # (4, L, H, gh, gw)
        cand.entropy = entropy(m.flatten(-2)).numpy()
        if self.cfg.keep_maps or self.regressor is not None:
            cand.pooled = torch.nn.functional.adaptive_avg_pool2d(
                m.reshape(-1, 1, gh, gw), self.cfg.grid).reshape(
                4, len(self.layers), len(self.heads), self.cfg.grid, self.cfg.grid).numpy()
        return cand, m

    # ---- per query ------------------------------------------------------------------------------
    def _query_result(self, q: Query, cands: list[Candidate], full_maps: list, grid_hw, orig_hw,
                      prompt: tuple[np.ndarray, np.ndarray] | None = None) -> QueryResult:
        k = len(cands)
        gh, gw = grid_hw
        oh, ow = orig_hw
        boxes = np.array([c.box if c.box is not None else (np.nan,) * 4 for c in cands], dtype=np.float64)
        arrays = QueryArrays(boxes=boxes, mean_logprob=np.array([c.mean_logprob for c in cands]),
                             gt=np.array(q.gt, dtype=np.float64) if q.gt is not None else None,
                             seed=query_seed(self.cfg.sampling.seed, q.query_id + "/random"))
        scores = {"greedy": score_greedy(arrays), "random": score_random(arrays),
                  "logprob": score_logprob(arrays), "vote": score_vote(arrays)}
        if any(m is not None for m in full_maps):
            nl, nh = len(self.layers), len(self.heads)
            ent = np.full((k, 4, nl, nh), np.nan)
            for c in cands:
                if c.entropy is not None:
                    ent[c.cand_idx] = c.entropy
            scores["acs-free"] = self._acs_free(ent, arrays)
            if self.cfg.capture == "all":
                scores["loc-mass"] = self._loc_mass(full_maps, boxes, (gh, gw), (oh, ow), arrays)
            if self.regressor is not None:
                scores["acs-learned"] = self._learned(cands, arrays.valid)
        if prompt is not None and self.profile.loc_heads:
            grid_boxes = boxes * np.array([gw / ow, gh / oh, gw / ow, gh / oh])
            scores["loc-heads"] = score_loc_heads(
                QueryArrays(boxes=boxes, mean_logprob=arrays.mean_logprob, grid_boxes=grid_boxes,
                            prompt_maps=prompt[0]), self.profile.loc_heads)
        if q.gt is not None:
            scores["oracle"] = score_oracle(arrays)
            ious = box_iou(boxes, arrays.gt[None])[:, 0]
            for c in cands:
                c.iou = float(ious[c.cand_idx])
        for name, s in scores.items():
            for c in cands:
                c.scores[name] = float(s[c.cand_idx])
        selected = {name: select(s) for name, s in scores.items()}
        n_ok = int(arrays.valid.sum())
        status, error = ("ok", None) if n_ok else ("no_box", f"none of the {k} candidates contained a box")
        return QueryResult(query_id=q.query_id, status=status, error=error, candidates=cands,
                           selected=selected, grid_hw=(gh, gw), layers=list(self.layers),
                           heads=list(self.heads),
                           prompt_mass=prompt[1] if prompt is not None else None,
                           prompt_spatial_entropy=spatial_entropy(prompt[0]) if prompt is not None else None)

    def _acs_free(self, ent: np.ndarray, arrays: QueryArrays) -> np.ndarray:
        # Entropy was captured for self.layers x self.heads; index the profile's pairs in it.
        li = {l: i for i, l in enumerate(self.layers)}
        hi = {h: i for i, h in enumerate(self.heads)}
        prof = HeadProfile(self.profile.model_id, [(li[l], hi[h]) for l, h in self.profile.heads])
        return score_acs_free(QueryArrays(boxes=arrays.boxes, mean_logprob=arrays.mean_logprob, entropy=ent),
                              prof)

    def _loc_mass(self, full_maps, boxes, grid_hw, orig_hw, arrays) -> np.ndarray:
        gh, gw = grid_hw
        oh, ow = orig_hw
        band = [self.layers.index(l) for l in middle_band(len(self.layers))]
        k = len(full_maps)
        maps = np.zeros((k, 4, len(band), len(self.heads), gh, gw))
        for i, m in enumerate(full_maps):
            if m is not None:
                maps[i] = m[:, band].numpy()
        grid_boxes = boxes * np.array([gw / ow, gh / oh, gw / ow, gh / oh])
        q = QueryArrays(boxes=boxes, mean_logprob=arrays.mean_logprob, maps=maps, grid_boxes=grid_boxes)
        return score_loc_mass(q, layers=list(range(len(band))))

    @torch.inference_mode()
    def _learned(self, cands, valid) -> np.ndarray:
        out = np.full(len(cands), np.nan)
        idx = [c.cand_idx for c in cands if c.pooled is not None and valid[c.cand_idx]]
        if idx:
            x = torch.from_numpy(np.stack([cands[i].pooled for i in idx])).float()
            out[idx] = self.regressor(x).numpy()
        return out


def _agree(cands: list[Candidate], thr: float) -> bool:
    boxes = [c.box for c in cands]
    if any(b is None for b in boxes):
        return False
    iou = box_iou(np.array(boxes), np.array(boxes))
    return bool(iou.min() >= thr)
