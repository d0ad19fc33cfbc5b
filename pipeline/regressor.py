"""ACS-Learned: a small CNN from a candidate's pooled attention maps to its predicted IoU.

Architecture (METHOD.md, ours): maps pooled to G x G, channels = 4 coordinate tokens x L x H,
a 1x1 conv to 64 channels, two 3x3 convs, global average pool, MLP, sigmoid. Saved as safetensors
with a JSON sidecar naming the model id, L, H, G and the training data; the sidecar is validated
before the weights are used.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class IoURegressor(nn.Module):
    def __init__(self, num_layers: int, num_heads: int, grid: int = 16, width: int = 64):
        super().__init__()
        self.num_layers, self.num_heads, self.grid = num_layers, num_heads, grid
        c = 4 * num_layers * num_heads
        self.net = nn.Sequential(
            nn.Conv2d(c, width, 1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1),
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        # maps: (B, 4, L, H, G, G) -> (B,) predicted IoU in [0, 1]
        b = maps.shape[0]
        x = maps.reshape(b, -1, self.grid, self.grid) * (self.grid * self.grid)  # ~1 per cell
        return torch.sigmoid(self.net(x)).squeeze(1)


def save_regressor(model: IoURegressor, out_dir: str | Path, meta: dict) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "regressor.safetensors"))
    sidecar = {"num_layers": model.num_layers, "num_heads": model.num_heads, "grid": model.grid, **meta}
    (out / "regressor.json").write_text(json.dumps(sidecar, indent=2))
    return out


def load_regressor(path: str | Path, num_layers: int, num_heads: int) -> tuple[IoURegressor, dict]:
    """Load and check a regressor against the model it will score; clear errors when it does not fit."""
    from safetensors.torch import load_file

    p = Path(path)
    weights, sidecar = p / "regressor.safetensors", p / "regressor.json"
    if not weights.exists() or not sidecar.exists():
        raise FileNotFoundError(f"regressor at {p} needs regressor.safetensors and regressor.json")
    meta = json.loads(sidecar.read_text())
    for key in ("num_layers", "num_heads", "grid"):
        if not isinstance(meta.get(key), int) or meta[key] <= 0:
            raise ValueError(f"regressor sidecar {sidecar}: {key!r} must be a positive integer")
    if (meta["num_layers"], meta["num_heads"]) != (num_layers, num_heads):
        raise ValueError(f"regressor {p} was trained for {meta['num_layers']} layers x {meta['num_heads']} "
                         f"heads, the model has {num_layers} x {num_heads}")
    model = IoURegressor(num_layers, num_heads, meta["grid"])
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), meta
