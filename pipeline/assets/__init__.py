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
