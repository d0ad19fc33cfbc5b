"""Candidate sampling with one prefill per query, and the teacher-forced capture pass.

`generate(num_return_sequences=N)` would repeat the prompt, and with it the vision tower and the
whole prefill, N times. Here the batch of prompts is prefilled once, the KV cache is repeated to
K = N + 1 rows per query (row 0 greedy, rows 1..N sampled), and a plain decode loop runs all rows
together. The prefix cache is then reused by the capture pass, which feeds each candidate's own
tokens back in one forward and reads attention only where a box coordinate was generated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .capture import CaptureRequest, capturing, install, pad_positions
from .models.base import Adapter, Encoded


@dataclass
class SamplingConfig:
    num_candidates: int = 10  # sampled candidates N; the greedy one comes on top (cand_idx 0)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0

    def __post_init__(self):
        if self.num_candidates < 0:
            raise ValueError(f"num_candidates must be >= 0 (0 = greedy only), got {self.num_candidates}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


@dataclass
class Generation:
    """K rows per query, query-major: row q * K + k is candidate k of query q."""

    k: int
    tokens: list[list[int]]  # generated ids, EOS excluded
    logprobs: list[list[float]]  # log p(token) under the model (temperature 1) per generated token
    cache: DynamicCache  # prefix + generated tokens
    mask: torch.Tensor  # (Q*K, P) prefix attention mask
    rope_deltas: torch.Tensor  # (Q*K, 1) position offset after the prompt (zeros without M-RoPE)
    n_generated: int  # tokens generated over all rows (for cost accounting)


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
           greedy: bool = True) -> Generation:
    """K = N + 1 rows per query (row 0 greedy), or K = N sampled rows with `greedy=False`."""
    model = adapter.model
    k = cfg.num_candidates + (1 if greedy else 0)
    nq = len(query_keys)
    # Prefill: vision tower + prompt, once. Only the last position's logits are used: the whole
    # prompt's would be batch x prompt x vocab (about 3 GB at batch 8 for Qwen2.5-VL-7B's 152k).
    out = model(**adapter.prefill_inputs(enc), use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    deltas = adapter.rope_deltas(enc).repeat_interleave(k, 0)
    cache.batch_repeat_interleave(k)
    prefix_mask = enc.inputs["attention_mask"].repeat_interleave(k, 0)
    logits = out.logits[:, -1].float().repeat_interleave(k, 0)  # (Q*K, V)

    # Generators live on the logits' device so sampling never copies rows x vocab to the host.
    gens = [torch.Generator(device=logits.device).manual_seed(query_seed(cfg.seed, q)) for q in query_keys]
    eos = torch.tensor(adapter.eos_token_ids, device=logits.device)
    rows = nq * k
    done = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    is_greedy = ((torch.arange(rows, device=logits.device) % k) == 0) & greedy
    tokens = torch.full((rows, cfg.max_new_tokens), adapter.pad_token_id, dtype=torch.long,
                        device=logits.device)
    logps = torch.zeros(rows, cfg.max_new_tokens, device=logits.device)
    mask = prefix_mask
    steps = 0
    for t in range(cfg.max_new_tokens):
        logp = logits.log_softmax(-1)
        warped = _filter_top_p(logits / max(cfg.temperature, 1e-5), cfg.top_p)
        probs = warped.softmax(-1)
        # One generator per query keeps a query's samples identical whatever it is batched with.
        drawn = torch.cat([torch.multinomial(probs[q * k:(q + 1) * k], 1, generator=gens[q])
                           for q in range(nq)]).squeeze(1)
        nxt = torch.where(is_greedy, logits.argmax(-1), drawn)
        nxt = torch.where(done, torch.full_like(nxt, adapter.pad_token_id), nxt)
        tokens[:, t] = nxt
        logps[:, t] = logp.gather(1, nxt[:, None]).squeeze(1)
        done = done | torch.isin(nxt, eos)
        steps = t + 1
        if bool(done.all()) or steps == cfg.max_new_tokens:
            break  # no forward for a token that will never be used
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=mask.device)], 1)
        step = model(input_ids=nxt[:, None], attention_mask=mask, cache=cache, use_cache=True,
                     position_ids=adapter.text_positions(mask, 1, deltas))
        logits = step.logits[:, -1].float()

    tok_lists, lp_lists, n_gen = [], [], 0
    eos_set = set(adapter.eos_token_ids)
    for r in range(rows):
        seq = tokens[r, :steps].tolist()
        cut = next((i for i, x in enumerate(seq) if x in eos_set), len(seq))
        n_gen += min(cut + 1, len(seq))
        tok_lists.append(seq[:cut])
        lp_lists.append(logps[r, :cut].tolist())
    return Generation(k=k, tokens=tok_lists, logprobs=lp_lists, cache=cache, mask=prefix_mask,
                      rope_deltas=deltas, n_generated=n_gen)


@torch.inference_mode()
def capture_rows(adapter: Adapter, enc: Encoded, gen: Generation, wanted: list[list[int]],
                 layers: list[int], heads: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """Attention onto the visual tokens from the steps that generated the `wanted` tokens.

    `wanted[r]` lists generated-token indices of row r. The step that generated token j had token
    j - 1 as its input (the last prompt token for j = 0), so we feed [last prompt token] + tokens
    against the prefix cache minus its last entry, and read input row j for token j.
    Returns per row a (len(wanted[r]), len(layers), H_sel, V_r) float32 tensor, or None if empty.
    """
    model = adapter.model
    install(model)
    rows = len(gen.tokens)
    need = [r for r in range(rows) if wanted[r]]
    if not need:
        return [None] * rows
    device = gen.mask.device
    prefix_len = gen.mask.shape[1]
    total = gen.cache.get_seq_length()
    cache = gen.cache
    cache.crop(-(total - prefix_len + 1))  # keep the prompt minus its last token
    cache.batch_select_indices(torch.tensor(need, device=device))
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
    req = CaptureRequest(layers=list(layers), heads=heads, rows=row_idx, vis_pos=vis_pos, vis_valid=vis_valid)
    with capturing(req):
        model(input_ids=inp, attention_mask=mask, cache=cache,
              use_cache=True, position_ids=pos, logits_to_keep=1)
    stacked = torch.stack([req.out[layer] for layer in layers], 2)  # (B', R, L, Hs, V)
    result: list[torch.Tensor | None] = [None] * rows
    for i, r in enumerate(need):
        result[r] = stacked[i, : len(wanted[r]), :, :, : vis[i].numel()]
    return result
