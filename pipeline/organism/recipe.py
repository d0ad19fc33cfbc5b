"""A training recipe: the committed list of phases that takes the organism from random weights to
the shipped checkpoint. One JSON file, with the bases it `extends`, says everything a rerun
needs (`recipes/` holds the shipped one and the variants it was chosen against), so the
checkpoint is reproducible by one command instead of by a history of hand-stopped runs with
different flags.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

RECIPES = Path(__file__).parent / "recipes"


@dataclass(frozen=True)
class Phase:
    """`steps` optimiser steps with their own warm-up + cosine schedule (from `lr` down to
    `min_lr_frac * lr`). The optimizer's moments carry over from the phase before."""

    name: str
    steps: int
    lr: float
    warmup: int = 0
    min_lr_frac: float = 0.05
    # Curriculum: training scenes of 1 to `max_objects` objects; None draws the benchmark's own
    # scenes (2 to `scenes.MAX_OBJECTS`).
    max_objects: int | None = None
    # Training scenes' (small, medium, large) shares when sampling object sizes; None: the
    # benchmark's own mix. More small objects is more gradient where the organism is weakest.
    size_mix: tuple[float, float, float] | None = None
    # Share of training scenes whose other objects each share the colour or the shape of one
    # object (`scenes.make_scene(confusers=...)`): an answer that reads one word of the query is
    # then wrong as often as a random pick. "colour" / "shape": every scene, that attribute shared,
    # so only the other word of the query finds the object. None: the benchmark's own draw.
    confusers: float | str | None = None
    # Share of the later turns of a training chat that ask the other way round: "what is at
    # [box]?", answered with the category (`batcher.ask_prompt`). None: none do.
    ask_share: float | None = None
    # Share of the later turns that ask for every object of the scene, each box followed by its
    # label, left to right (`batcher.DETECT_PROMPT`); checked before `ask_share`. None: none do.
    detect_share: float | None = None
    # The tower stays fixed (no backward through it) until the language model reads its features:
    # trained jointly from random weights, it collapsed to one constant vector (finding 1).
    train_vision: bool = True
    vision_lr_scale: float = 1.0
    text_lr_scale: float = 1.0
    # The length the warm-up + cosine schedule is laid over, when a phase was ended before it ran
    # out (a later phase branched off mid-way): the steps it did train keep their learning rates,
    # so the recipe still reruns exactly. None: `steps`.
    schedule_steps: int | None = None
    # From this phase on, the `rope_slow_pairs` slowest rotary pairs of each text head turn 100x
    # slower (`model.slow_rotary`): channels that are nearly free of position, in the text and
    # across the image alike, so a word can be matched to what it names wherever both sit. No
    # weight changes shape; the change is in the checkpoint's config (Qwen2.5-VL's own `llama3`
    # rope type). None: as the phase before (the model's own at the first phase).
    rope_slow_pairs: int | None = None
    # From this phase on, the user turn puts the query before or after the image (one of
    # `models.base.QUERY_ORDERS`; exported into acs_model.json, so inference prompts as trained).
    # Text first, every visual token can read the query: whether it is the object asked for is
    # then a feature of the token itself. None: as the phase before (image first at the start).
    query_order: str | None = None
    # Queries per training chat in this phase (None: the recipe's `turns`). Later turns come after
    # the image whatever `query_order` says, so a text-first phase may want only the first.
    turns: int | None = None
    # Weight of `batcher.target_cell_loss` added to the answers' cross-entropy: each visual token of
    # the first turn's image says whether it lies inside the queried object's box. Needs the
    # query before the image (`query_order` text_first), or the tokens cannot see it. None: off.
    target_cells: float | None = None
    # Weight of `batcher.object_word_loss` added too: each visual token inside an object's box
    # names its colour and its shape through the tied head, read at hidden state
    # `object_words_layer` (0: the tower's tokens as the language model gets them). It makes the
    # object's attributes, shape above all, visible in the tokens a query must be matched
    # against. None: off.
    object_words: float | None = None
    object_words_layer: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.lr <= 0 or self.warmup < 0 or not 0 <= self.min_lr_frac <= 1:
            raise ValueError(f"phase {self.name!r}: steps >= 1, lr > 0, warmup >= 0 and "
                             f"0 <= min_lr_frac <= 1 are required")
        if self.max_objects is not None and self.max_objects < 1:
            raise ValueError(f"phase {self.name!r}: max_objects must be >= 1 or null")
        if self.confusers is not None and not (self.confusers in ("colour", "shape") or (
                not isinstance(self.confusers, str) and 0 <= self.confusers <= 1)):
            raise ValueError(f"phase {self.name!r}: confusers must be a share in [0, 1], 'colour', 'shape' or null")
        if self.rope_slow_pairs is not None and self.rope_slow_pairs < 0:
            raise ValueError(f"phase {self.name!r}: rope_slow_pairs must be >= 0 or null")
        from ..models.base import QUERY_ORDERS

        if self.query_order is not None and self.query_order not in QUERY_ORDERS:
            raise ValueError(f"phase {self.name!r}: query_order must be one of {QUERY_ORDERS} or null")
        if self.target_cells is not None and self.target_cells < 0:
            raise ValueError(f"phase {self.name!r}: target_cells must be a weight >= 0 or null")
        if self.object_words is not None and self.object_words < 0:
            raise ValueError(f"phase {self.name!r}: object_words must be a weight >= 0 or null")
        if self.object_words_layer < 0:
            raise ValueError(f"phase {self.name!r}: object_words_layer must be a hidden-state index >= 0")
        if self.turns is not None and self.turns < 1:
            raise ValueError(f"phase {self.name!r}: turns must be >= 1 or null")
        if self.detect_share is not None and not 0 <= self.detect_share <= 1:
            raise ValueError(f"phase {self.name!r}: detect_share must be a share in [0, 1] or null")
        if self.ask_share is not None and not 0 <= self.ask_share <= 1:
            raise ValueError(f"phase {self.name!r}: ask_share must be a share in [0, 1] or null")
        if self.size_mix is not None:
            mix = tuple(float(v) for v in self.size_mix)
            if len(mix) != 3 or min(mix) < 0 or abs(sum(mix) - 1) > 1e-6:
                raise ValueError(f"phase {self.name!r}: size_mix must be 3 shares >= 0 summing to 1, "
                                 f"got {self.size_mix}")
            object.__setattr__(self, "size_mix", mix)  # JSON gives a list; phases compare as tuples

    def lr_at(self, step_in_phase: int) -> float:
        import math

        if step_in_phase < self.warmup:
            return self.lr * (step_in_phase + 1) / self.warmup
        frac = (step_in_phase - self.warmup) / max(1, (self.schedule_steps or self.steps) - self.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * cos)


@dataclass(frozen=True)
class Stop:
    """Premise bars on calib at which the run has done its job and ends early (checked at every
    premise evaluation, at `Recipe.temperature`). None: that bar is not checked."""

    greedy_large: float | None = None
    greedy_small: float | None = None
    room_small: float | None = None

    def met(self, premise_at_t: dict) -> bool:
        checks = [(self.greedy_large, premise_at_t["greedy"]["large"]["acc50"]),
                  (self.greedy_small, premise_at_t["greedy"]["small"]["acc50"]),
                  (self.room_small, premise_at_t["oracle_room_small"])]
        active = [(bar, got) for bar, got in checks if bar is not None]
        return bool(active) and all(got >= bar for bar, got in active)


@dataclass(frozen=True)
class Recipe:
    name: str
    phases: tuple[Phase, ...]
    seed: int = 0
    batch_size: int = 32
    turns: int = 4
    # bf16 autocast of the forward pass (weights and optimizer stay fp32); measured against fp32
    # on these CPUs in the model card before it was chosen.
    bf16_autocast: bool = False
    model: dict = field(default_factory=dict)  # OrganismConfig fields that differ from its defaults
    ckpt_every: int = 25
    eval_every: int = 100  # greedy Acc@0.5 per bucket + image dependence
    eval_n: int = 96  # calib queries per evaluation (48 swung by 0.25 between evaluations)
    premise_every: int = 500  # best-of-N, room, head Spearman, no-box share (and at each phase end)
    premise_candidates: int = 10
    temperature: float = 1.0  # the sampling temperature the premise evaluations (and Stop) use
    final_temperatures: tuple[float, ...] = (0.7, 1.0, 1.3)  # compared once at the end, on calib
    stop: Stop = field(default_factory=Stop)

    def __post_init__(self):
        for i, p in enumerate(self.phases):
            if p.target_cells and carried_at(self, i, "query_order", "image_first") != "text_first":
                raise ValueError(f"phase {p.name!r}: target_cells needs query_order text_first (image first, "
                                 f"the visual tokens cannot see the query)")

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def phase_at(self, step: int) -> tuple[int, Phase, int]:
        """(index, phase, step within it) of global step `step` (0-based; past the end: the last)."""
        start = 0
        for i, p in enumerate(self.phases):
            if step < start + p.steps or i == len(self.phases) - 1:
                return i, p, step - start
            start += p.steps
        raise ValueError("a recipe has at least one phase")

    def phase_end(self, index: int) -> int:
        return sum(p.steps for p in self.phases[: index + 1])

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, data: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {sorted(known)}")
    return cls(**data)


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    data = dict(data)
    if not data.get("phases"):
        raise ValueError(f"{where}: 'phases' must be a non-empty list")
    names = [p.get("name") for p in data["phases"]]
    if len(set(names)) != len(names) or None in names:
        raise ValueError(f"{where}: every phase needs a unique 'name', got {names}")
    data["phases"] = tuple(_build(Phase, p, f"{where}, phase {p.get('name')!r}") for p in data["phases"])
    data["stop"] = _build(Stop, data.get("stop") or {}, f"{where}, stop")
    if "final_temperatures" in data:
        data["final_temperatures"] = tuple(data["final_temperatures"])
    from .model import OrganismConfig

    _build(OrganismConfig, data.get("model") or {}, f"{where}, model")
    return _build(Recipe, data, where)


def _find(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists() and (RECIPES / f"{path}.json").exists():
        p = RECIPES / f"{path}.json"
    if not p.exists():
        known = sorted(q.stem for q in RECIPES.glob("*.json"))
        raise FileNotFoundError(f"no recipe {str(path)!r} (a JSON file, or one of {known})")
    return p


def _read(path: str | Path, seen: tuple[Path, ...] = ()) -> tuple[dict, Path]:
    """A recipe file as a plain dict, its `extends` resolved.

    A variant branches off a lineage after its last phase: `{"extends": "BASE", "name": ...,
    "phases": [...]}` is BASE's recipe with these phases appended (none: BASE's phases only) and
    any other key given replacing BASE's value whole (`model`, `stop` too, not merged). So a
    variant's file holds what it changes, not a copy of every phase before it that a later edit of
    one copy could silently make disagree with the run it forks from. `"branch_at": {"phase":
    NAME, "steps": N}` branches off mid-way instead: BASE's phases end with NAME cut at N steps.
    BASE is a file beside this one (with or without `.json`), else looked up like
    `load_recipe`'s argument."""
    p = _find(path)
    if p.resolve() in seen:
        chain = " -> ".join(str(q) for q in (*seen, p.resolve()))
        raise ValueError(f"{p}: recipes extend each other in a cycle ({chain})")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a recipe is a JSON object")
    base_name = data.pop("extends", None)
    if base_name is None:
        return data, p
    if not isinstance(base_name, str) or "name" not in data:
        raise ValueError(f"{p}: 'extends' names one base recipe, and a variant needs its own 'name'")
    near = [q for q in (p.parent / base_name, p.parent / f"{base_name}.json") if q.exists()]
    base, _ = _read(near[0] if near else base_name, (*seen, p.resolve()))
    phases = list(base["phases"])
    branch = data.pop("branch_at", None)
    if branch is not None:
        phases = _branch(phases, branch, f"{p}: 'branch_at'")
    extra = data.pop("phases", [])
    if not isinstance(extra, list):
        raise ValueError(f"{p}: 'phases' of a variant is a list of the phases it appends to {base_name!r}")
    return {**base, **data, "phases": [*phases, *extra]}, p


def _branch(phases: list[dict], at, where: str) -> list[dict]:
    """The base's phases up to `at["phase"]`, that one ended after `at["steps"]` steps on its own
    schedule (`Phase.schedule_steps`), so the steps it trained keep their learning rates and a run
    of the variant can fork from the base's run mid-phase."""
    if not isinstance(at, dict) or set(at) != {"phase", "steps"}:
        raise ValueError(f"{where} is {{\"phase\": NAME, \"steps\": N}}, got {at!r}")
    names = [ph.get("name") for ph in phases]
    if at["phase"] not in names:
        raise ValueError(f"{where}: the base has no phase {at['phase']!r} (it has {names})")
    i = names.index(at["phase"])
    cut = dict(phases[i])
    if not isinstance(at["steps"], int) or not 1 <= at["steps"] <= cut["steps"]:
        raise ValueError(f"{where}: steps must be 1 to the phase's {cut['steps']}, got {at['steps']!r}")
    cut["schedule_steps"] = cut.get("schedule_steps") or cut["steps"]
    cut["steps"] = at["steps"]
    return [*phases[:i], cut]


def load_recipe(path: str | Path) -> Recipe:
    """A recipe file; a bare name (`organism-v2`) is looked up in the committed `recipes/`."""
    data, p = _read(path)
    return recipe_from_dict(data, where=str(p))


def carried_at(recipe: Recipe, index: int, name: str, default):
    """A setting that carries forward (`rope_slow_pairs`, `query_order`) in phase `index`: the
    last phase up to it that sets it, else `default`."""
    set_ = [getattr(p, name) for p in recipe.phases[:index + 1] if getattr(p, name) is not None]
    return set_[-1] if set_ else default


def same_settings(a: Recipe, b: Recipe) -> bool:
    """The settings that shape every phase's training (evaluation settings may differ)."""
    key = lambda r: (r.seed, r.batch_size, r.turns, r.bf16_autocast, r.model)  # noqa: E731
    return key(a) == key(b)


def cut_short(trained: Phase, now: Phase) -> bool:
    """`now` is `trained` ended early: the same phase on the same schedule, fewer steps."""
    sched = lambda p: {**asdict(p), "steps": 0, "schedule_steps": p.schedule_steps or p.steps}  # noqa: E731
    return now.steps <= trained.steps and sched(now) == sched(trained)


def shared_prefix(a: Recipe, b: Recipe) -> int:
    """How many leading phases two recipes share exactly, with the same batch and model settings
    (0 when anything that shapes those phases differs)."""
    if not same_settings(a, b):
        return 0
    n = 0
    for pa_, pb in zip(a.phases, b.phases):
        if pa_ != pb:
            break
        n += 1
    return n


def choose_temperature(premise: dict) -> float:
    """The shipped temperature, from calib: the most oracle room on small objects, ties (within one
    query's worth, 1e-9 here: exact ties) broken by the larger small-object oracle mIoU."""
    def key(t):
        r = premise[t]
        return (round(r["oracle_room_small"], 9), r["oracle"]["small"]["miou"])
    return float(max(premise, key=key))
