"""The model card's tables, made from a run's own `train_log.jsonl` and `recipe.json`, so that no
figure in the card is copied by hand. The card's prose lives beside the recipe
(`recipes/NAME.card.md`) with `{{phases}}`, `{{metrics}}`, `{{premise}}` and `{{final}}`
markers, and `{{compare:RUN_A,RUN_B,...}}` for side-by-side variant runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .recipe import RECIPES, choose_temperature, recipe_from_dict

BUCKETS = ("small", "medium", "large", "all")


def read_log(run: str | Path) -> list[dict]:
    path = Path(run) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _f(v, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}"


def _acc(rec: dict, nd: int = 2) -> str:
    return " / ".join(_f(rec[b]["acc50"], nd) for b in ("small", "medium", "large"))


def _gap(dep: dict) -> str:
    return " / ".join(_f(v, 2) for v in dep["gap_per_coordinate"].values())


def phases_table(run: str | Path) -> str:
    recipe = recipe_from_dict(json.loads((Path(run) / "recipe.json").read_text()))
    log = read_log(run)
    walls = {r["step"]: r["wall_s"] for r in log if "wall_s" in r and "loss" in r}
    losses = {r["step"]: r["loss"] for r in log if "loss" in r}
    reached = max((r.get("step", 0) for r in log), default=0)
    rows = ["| phase | steps | objects per scene | what trains | peak lr (warm-up) | loss at its end | wall |",
            "|---|---|---|---|---|---|---|"]
    start = 0
    for i, p in enumerate(recipe.phases):
        end = recipe.phase_end(i)
        done = min(end, reached)
        trains = "language model (tower frozen)" if not p.train_vision else \
            f"everything, tower lr x {p.vision_lr_scale:g}" + (f", text lr x {p.text_lr_scale:g}" if p.text_lr_scale != 1 else "")
        objects = f"1-{p.max_objects}" if p.max_objects else "2-5 (the benchmark's)"
        if p.size_mix:
            objects += ", sizes s/m/l " + "/".join(f"{v:g}" for v in p.size_mix)
        logged = [s for s in walls if start < s <= done]
        before = [s for s in walls if s <= start]
        wall = walls[max(logged)] - (walls[max(before)] if before else 0.0) if logged else None
        status = "" if done >= end else (f" (reached {done:,})" if done > start else " (not reached)")
        rows.append(f"| {p.name} | {start:,}-{end:,}{status} | {objects} | {trains} | {p.lr:g} ({p.warmup}) | "
                    f"{_f(losses.get(max(logged)) if logged else None)} | {'-' if wall is None else f'{wall:,.0f} s'} |")
        start = end
    return "\n".join(rows)


def metrics_table(run: str | Path) -> str:
    evals = [r for r in read_log(run) if r.get("eval")]
    rows = ["| step | phase | greedy Acc@0.5 small / medium / large (n) | mIoU small / medium / large | "
            "greedy on the phase's curriculum scenes s / m / l | no-box | gap x1 / y1 / x2 / y2 | tower spread | "
            "query dependence x1 / y1 / x2 / y2 | greedy on another object |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in evals:
        n = "/".join(str(r[b]["n"]) for b in ("small", "medium", "large"))
        mi = " / ".join(_f(r[b]["miou"], 2) for b in ("small", "medium", "large"))
        cur = _acc(r["curriculum_greedy"]) if "curriculum_greedy" in r else "-"
        dep = r["image_dependence"]
        rows.append(f"| {r['step']:,} | {r.get('phase', '')} | {_acc(r)} ({n}) | {mi} | {cur} | "
                    f"{_f(r['no_box_share'], 2)} | {_gap(dep)} | {_f(dep['visual_content'], 2)} | "
                    f"{_gap(r['query_dependence']) if 'query_dependence' in r else '-'} | {_other_share(r)} |")
    return "\n".join(rows)


def _other_share(rec: dict) -> str:
    """Share of greedy answers on another object of the scene (logged since query binding was
    measured; "-" before)."""
    oc = (rec.get("outcomes") or {}).get("all")
    return f"{oc['other_object'] / oc['n']:.2f}" if oc and oc["n"] else "-"


def premise_rows(step: int, premise: dict) -> list[str]:
    out = []
    for t, p in premise.items():
        out.append(f"| {step:,} | {t} | {_acc(p['greedy'])} | {_acc(p['oracle'])} | {_f(p['oracle_room_small'])} | "
                   f"{_f(p['oracle']['small']['miou'])} | {_f(p['no_box_share_sampled'])} | "
                   f"{_f(p['best_head_spearman'], 2)} | {_f(p['median_head_spearman'], 2)} |")
    return out


PREMISE_HEADER = ["| step | T | greedy Acc@0.5 s / m / l | best-of-N Acc@0.5 s / m / l | room on small | "
                  "best-of-N mIoU small | no-box share (sampled) | best head Spearman | median head |",
                  "|---|---|---|---|---|---|---|---|---|"]


def premise_table(run: str | Path) -> str:
    # One row per (step, T), the last measured: ship.sh measures the shipped step again, and the
    # recipe's own final premise may already have.
    latest: dict[tuple[int, str], dict] = {}
    for r in read_log(run):
        for t, p in (r.get("premise") or {}).items():
            latest.pop((r["step"], t), None)
            latest[(r["step"], t)] = p
    rows = list(PREMISE_HEADER)
    for (step, t), p in sorted(latest.items(), key=lambda kv: kv[0][0]):
        rows += premise_rows(step, {t: p})
    return "\n".join(rows)


def chosen_temperature(run: str | Path, step: int) -> float | None:
    """The temperature chosen on calib for the checkpoint of `step`: the recipe's final choice, or
    (a run stopped before its end, as shipped by ship.sh) the rule applied to that step's premise
    over several temperatures. None when that step was never compared."""
    log = read_log(run)
    for r in reversed(log):
        if r.get("final") and r["final"]["step"] == step:
            return float(r["final"]["temperature"])
    for r in reversed(log):
        if r.get("premise") and len(r["premise"]) > 1 and r["step"] == step:
            return float(choose_temperature(r["premise"]))
    return None


def final_text(run: str | Path) -> str:
    finals = [r["final"] for r in read_log(run) if r.get("final")]
    stops = [r["stopped"] for r in read_log(run) if r.get("stopped")]
    if not finals:
        multi = [r for r in read_log(run) if r.get("premise") and len(r["premise"]) > 1]
        if not multi:
            return "The run has not finished its recipe; no temperature has been chosen yet."
        r = multi[-1]
        return (f"The run has not finished its recipe. By the recipe's rule (the most oracle room on small "
                f"objects, ties to the larger oracle mIoU), the premise of step {r['step']:,} above chooses "
                f"**T = {choose_temperature(r['premise']):g}** for this checkpoint.")
    f = finals[-1]
    return (f"Shipped temperature, chosen on calib at step {f['step']:,}: **T = {f['temperature']:g}**"
            + (f" ({stops[-1]})." if stops else "."))


def compare_table(runs: list[str | Path]) -> str:
    """Variant runs side by side at the evaluation steps they share (same eval set)."""
    logs = {str(r): {e["step"]: e for e in read_log(r) if e.get("eval")} for r in runs}
    steps = sorted(set.intersection(*(set(v) for v in logs.values()))) if logs else []
    names = {str(r): json.loads((Path(r) / "recipe.json").read_text())["name"] for r in runs}
    rows = ["| step | recipe | greedy s / m / l | mIoU all | curriculum greedy s / m / l | gap x1 / y1 / x2 / y2 | "
            "best-of-N s / m / l | tower spread |", "|---|---|---|---|---|---|---|---|"]
    for s in steps:
        first = min(str(r) for r in runs)
        if all(logs[k][s] == logs[first][s] for k in logs) and len(logs) > 1:
            continue  # a shared (forked) prefix: the same evaluation in every run
        for r in runs:
            e = logs[str(r)][s]
            pm = e.get("premise")
            bon = _acc(next(iter(pm.values()))["oracle"]) if pm else "-"
            cur = _acc(e["curriculum_greedy"]) if "curriculum_greedy" in e else "-"
            rows.append(f"| {s:,} | {names[str(r)]} | {_acc(e)} | {_f(e['all']['miou'])} | {cur} | "
                        f"{_gap(e['image_dependence'])} | {bon} | {_f(e['image_dependence']['visual_content'], 2)} |")
    return "\n".join(rows)


def model_card(run: str | Path, template: str | Path | None = None, runs_root: str | Path | None = None) -> str:
    """The card: the recipe's card template with its markers replaced by tables from `run`."""
    run = Path(run)
    name = json.loads((run / "recipe.json").read_text())["name"]
    tpl = Path(template) if template else RECIPES / f"{name}.card.md"
    text = tpl.read_text() if tpl.exists() else "# The organism\n\n{{phases}}\n\n{{metrics}}\n\n{{premise}}\n\n{{final}}\n"
    text = (text.replace("{{phases}}", phases_table(run)).replace("{{metrics}}", metrics_table(run))
            .replace("{{premise}}", premise_table(run)).replace("{{final}}", final_text(run)))
    root = Path(runs_root) if runs_root else run.parent
    while "{{compare:" in text:
        i = text.index("{{compare:")
        j = text.index("}}", i)
        runs = [root / r.strip() for r in text[i + len("{{compare:"):j].split(",")]
        text = text[:i] + compare_table(runs) + text[j + 2:]
    return text
