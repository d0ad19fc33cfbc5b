"""Attention capture for chosen query rows, layers and heads, beside fused attention.

`generate(output_attentions=True)` forces eager attention and materialises L x H x T x T weights
at every step. Instead we register an attention function ("acs_capture") that runs SDPA as usual
and, only while a `CaptureRequest` is active and only for the requested layers, computes
softmax(q K^T / sqrt(d)) for a few query rows against the visual-token keys.

Restricting the softmax to visual keys is exactly "attention renormalised over visual tokens":
p_v / sum_v' p_v' = exp(s_v) / sum_v' exp(s_v'), so no mask is needed (visual keys always precede
the box tokens, and padding is never a visual position).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTN_NAME = "acs_capture"


@dataclass
class CaptureRequest:
    layers: list[int]
    heads: torch.Tensor | None  # head indices to keep (None: all)
    rows: torch.Tensor  # (B, R) positions within the current input's query length
    vis_pos: torch.Tensor  # (B, V) key positions of visual tokens (padded)
    vis_valid: torch.Tensor  # (B, V) bool
    out: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, R, H_sel, V) float32
    # With mass_idx (Bm,) (batch rows) and key_valid (Bm, K) (the keys those rows may attend to
    # besides causality: the padding mask), `mass` gets per layer the share of their rows' attention
    # that lands on the visual tokens before renormalising, (Bm, R, H_sel): what the
    # localization-heads baseline ranks heads by. Only the few batch rows asked for pay for it.
    mass_idx: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    mass: dict[int, torch.Tensor] = field(default_factory=dict)


_ACTIVE: contextvars.ContextVar[CaptureRequest | None] = contextvars.ContextVar("acs_capture", default=None)


def capture_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """SDPA for the output; exact probabilities for the requested rows on the side."""
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    req = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if req is not None and layer in req.layers:
        req.out[layer], mass = _rows_over_visual(req, query, key, kwargs.get("scaling") or module.scaling)
        if mass is not None:
            req.mass[layer] = mass
    return out


def _rows_over_visual(req: CaptureRequest, query: torch.Tensor, key: torch.Tensor, scaling: float):
    # query: (B, H, q_len, d); key: (B, KVH, k_len, d), keys already include the cached prefix.
    b, h, _, d = query.shape
    kvh = key.shape[1]
    heads = req.heads if req.heads is not None else torch.arange(h, device=query.device)
    q = query.transpose(1, 2)  # (B, q_len, H, d)
    q = torch.gather(q, 1, req.rows[:, :, None, None].expand(-1, -1, h, d))  # (B, R, H, d)
    q = q[:, :, heads]  # (B, R, Hs, d)
    k = torch.gather(key, 2, req.vis_pos[:, None, :, None].expand(-1, kvh, -1, d))  # (B, KVH, V, d)
    k = k[:, heads // (h // kvh)]  # grouped-query attention: head j reads KV head j // groups
    scores = torch.einsum("brhd,bhvd->brhv", q.float(), k.float()) * scaling  # (B, R, Hs, V)
    scores = scores.masked_fill(~req.vis_valid[:, None, None, :], float("-inf"))
    mass = None
    if req.mass_idx is not None:
        # The same rows against every key they can see: log of the full softmax's normaliser.
        m = req.mass_idx
        k_all = key[m][:, heads // (h // kvh)]  # (Bm, Hs, K, d)
        full = torch.einsum("brhd,bhkd->brhk", q[m].float(), k_all.float()) * scaling  # (Bm, R, Hs, K)
        n_keys, q_len = key.shape[2], query.shape[2]
        causal = torch.arange(n_keys, device=key.device)[None, None, :] <= (n_keys - q_len + req.rows[m])[:, :, None]
        seen = causal & req.key_valid[:, None, :].bool()  # (Bm, R, K)
        full = full.masked_fill(~seen[:, :, None, :], float("-inf"))
        mass = (scores[m].logsumexp(-1) - full.logsumexp(-1)).exp()
    return scores.softmax(-1), mass


class capturing:
    """Context manager that activates a request for the forward passes inside it."""

    def __init__(self, req: CaptureRequest):
        self.req = req

    def __enter__(self):
        self.token = _ACTIVE.set(self.req)
        return self.req

    def __exit__(self, *exc):
        _ACTIVE.reset(self.token)


def install(model) -> None:
    """Route the text model's attention through the capture function (vision tower untouched)."""
    text_cfg = model.config.get_text_config()
    text_cfg._attn_implementation = ATTN_NAME


# Registered once at import; the mask function must be registered too, or the model builds no
# padding mask for an unknown implementation name and left-padded batches attend to padding.
AttentionInterface.register(ATTN_NAME, capture_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


def pad_positions(positions: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged index lists into (B, Vmax) with a validity mask (padding points at index 0)."""
    vmax = max(int(p.numel()) for p in positions)
    idx = torch.zeros(len(positions), vmax, dtype=torch.long, device=device)
    valid = torch.zeros(len(positions), vmax, dtype=torch.bool, device=device)
    for i, p in enumerate(positions):
        idx[i, : p.numel()] = p.to(device)
        valid[i, : p.numel()] = True
    return idx, valid


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along `dim` (0 log 0 = 0)."""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim)
