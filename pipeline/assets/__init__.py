"""Shipped assets: the organism checkpoint, its head profile and regressor, a small test shard."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def default_paths(model: str, profile: str | None, regressor: str | None) -> tuple[str | None, str | None]:
    """For the organism, the shipped profile and regressor unless the user named others."""
    if model == "organism":
        if profile is None and (ASSETS / "organism" / "head_profile.json").exists():
            profile = str(ASSETS / "organism" / "head_profile.json")
        if regressor is None and (ASSETS / "organism" / "regressor" / "regressor.json").exists():
            regressor = str(ASSETS / "organism" / "regressor")
    return profile, regressor


def default_temperature(model: str, temperature: float | None) -> float:
    """The sampling temperature when the user named none: the one recorded with the model in its
    `acs_model.json` (the organism's, chosen on calib when it shipped), else 1.0."""
    import json
    import os

    if temperature is not None:
        return float(temperature)
    path = ASSETS / "organism" if model == "organism" else Path(model)
    meta = path / "acs_model.json"
    if os.path.isdir(path) and meta.exists():
        t = json.loads(meta.read_text()).get("temperature")
        if t is not None:
            return float(t)
    return 1.0
