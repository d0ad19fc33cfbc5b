"""The organism's training loop: runs a `Recipe` from random weights, resumably.

A run directory holds:
- `recipe.json`: the recipe it runs (a rerun with a recipe that rewrites a finished phase is
  refused; extending the current or adding later phases is allowed);
- `ckpt/`: the latest checkpoint (model, processor, optimizer moments, `state.json`), replaced
  atomically, so a kill at any moment leaves the previous one whole;
- `phases/NAME/`: the checkpoint at the end of each phase, from which a variant recipe that
  shares the phases so far can start (`fork_from`), instead of re-training them;
- `train_log.jsonl`: one JSON line per log interval and per evaluation; the model card's tables
  are made from it (`card.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .batcher import Batcher, object_word_loss, target_cell_loss, training_inputs, word_ids
from .model import OrganismConfig, build_organism, save_checkpoint, set_input_size, slow_rotary
from .probes import _content, greedy_eval, image_dependence, premise_eval, query_dependence
from .recipe import (Recipe, carried_at, choose_temperature, cut_short, recipe_from_dict, same_settings,
                     shared_prefix)
from .scenes import COLOURS, SHAPES

REWARM_STEPS = 20  # learning-rate ramp after --init-from (fresh optimizer moments)
LOG_EVERY = 20


def _save_opt(opt, model, path: Path) -> None:
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                tensors[f"{names[id(p)]}::exp_avg"] = st["exp_avg"].contiguous()
                tensors[f"{names[id(p)]}::exp_avg_sq"] = st["exp_avg_sq"].contiguous()
                tensors[f"{names[id(p)]}::step"] = torch.as_tensor(st["step"]).float().reshape(1)
    save_file(tensors, str(path))


def _load_opt(opt, model, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for name, p in model.named_parameters():
        if f"{name}::exp_avg" in tensors:
            opt.state[p] = {"exp_avg": tensors[f"{name}::exp_avg"], "exp_avg_sq": tensors[f"{name}::exp_avg_sq"],
                            "step": tensors[f"{name}::step"].reshape(())}


def _recover(ckpt: Path) -> None:
    """Finish or undo a checkpoint swap a kill interrupted (see `_checkpoint`)."""
    new, old = ckpt.with_name(ckpt.name + ".new"), ckpt.with_name(ckpt.name + ".old")
    if not ckpt.exists():
        if (new / "state.json").exists():
            new.rename(ckpt)
        elif old.exists():
            old.rename(ckpt)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _trim_log(log_path: Path, step: int) -> None:
    """Drop log records past the checkpoint being resumed: a run killed (or crashed) after its
    last checkpoint logged steps it will now train again, and the card would count them twice."""
    if not log_path.exists():
        return
    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    if len(keep) < len(lines):
        tmp = log_path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, log_path)


def _check_resumable(done: Recipe, now: Recipe, step: int) -> None:
    """A resumed run may extend its current phase (or the last one) and add phases, never rewrite
    what was trained: the phases before `step`'s phase in the new recipe must be those trained,
    and `step`'s own phase, if partly trained, may differ only in its length."""
    i_now = len(now.phases) if step >= now.total_steps else now.phase_at(step)[0]
    n = shared_prefix(done, now)
    ok = same_settings(done, now) and n >= min(i_now, len(done.phases))
    if not ok and same_settings(done, now) and n == i_now - 1 and n < len(done.phases):
        # The phase before `step` was ended here, on its own schedule (`Phase.schedule_steps`), for
        # a new phase to branch off: nothing trained is rewritten.
        ok = now.phase_end(n) == step and cut_short(done.phases[n], now.phases[n])
    started = i_now < len(now.phases) and step > (now.phase_end(i_now - 1) if i_now else 0)
    if ok and started and i_now < len(done.phases):
        ok = {**asdict(done.phases[i_now]), "steps": 0} == {**asdict(now.phases[i_now]), "steps": 0}
    if not ok:
        raise ValueError(f"the run in this directory is at step {step} of recipe {done.name!r}; this recipe "
                         f"changes phases already trained. Use another --out, or --fork-from that run to "
                         f"branch at a phase boundary")


def _fork(src_run: Path, out: Path, recipe: Recipe) -> int:
    """Start `out` from `src_run`'s checkpoint at the end of the last phase both recipes share."""
    src = recipe_from_dict(json.loads((src_run / "recipe.json").read_text()))
    n = shared_prefix(src, recipe)
    while n and not (src_run / "phases" / src.phases[n - 1].name / "state.json").exists():
        n -= 1  # that phase has not finished in the source run
    if n == 0:
        raise ValueError(f"{src_run} shares no finished phase with recipe {recipe.name!r}: nothing to fork from")
    snap = src_run / "phases" / src.phases[n - 1].name
    shutil.copytree(snap, out / "ckpt")
    end = src.phase_end(n - 1)
    lines = [line for line in (src_run / "train_log.jsonl").read_text().splitlines()
             if line.strip() and json.loads(line).get("step", 0) <= end]
    with (out / "train_log.jsonl").open("a") as f:
        f.write("".join(line + "\n" for line in lines))
        f.write(json.dumps({"step": end, "forked_from": str(src_run), "after_phase": src.phases[n - 1].name}) + "\n")
    return end


def train(recipe: Recipe, out: str | Path, threads: int = 0, max_minutes: float = 0,
          fork_from: str | Path | None = None, until_step: int | None = None,
          init_from: str | Path | None = None, print_fn=print) -> dict:
    """Run (or resume) `recipe` in `out`; returns the final state. Stops after a checkpoint when
    `max_minutes` of wall time have passed or at `until_step` (a side-by-side variant run; rerun
    to resume), and early when `recipe.stop` is met. `init_from` continues a new `out` from an
    exported checkpoint (the shipped organism: weights, step and log, but not the optimizer, which
    is not shipped: the moments start afresh, so the learning rate ramps up again over
    `REWARM_STEPS`; the one departure from an uninterrupted run)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from ..models.qwen2_5_vl import Qwen25VLAdapter

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per checkpoint write would drown the log
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, log_path = out / "ckpt", out / "train_log.jsonl"
    _recover(ckpt)

    def log(rec: dict) -> None:
        print_fn(json.dumps(rec))
        with log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    if not (ckpt / "state.json").exists() and fork_from:
        print_fn(f"forked from {fork_from} at step {_fork(Path(fork_from), out, recipe)}")
    oc = OrganismConfig(**recipe.model)
    if not (ckpt / "state.json").exists() and init_from:
        src = Path(init_from)
        meta0 = json.loads((src / "acs_model.json").read_text())
        if "recipe_spec" not in meta0:
            raise ValueError(f"{src} was not trained by a recipe; it cannot be continued by one")
        _check_resumable(recipe_from_dict(meta0["recipe_spec"]), recipe, int(meta0["steps"]))
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(src)
        state = {"step": int(meta0["steps"]), "next_index": int(meta0["next_index"]),
                 "wall_s": float(meta0["wall_s"]), "stopped": None, "rewarm_from": int(meta0["steps"])}
        if (src / "train_log.jsonl").exists() and not log_path.exists():
            shutil.copy(src / "train_log.jsonl", log_path)
        log({"step": state["step"], "init_from": str(src), "note": "fresh optimizer moments"})
        save_checkpoint(model, processor, ckpt, meta0)
        (ckpt / "state.json").write_text(json.dumps(state))
        (out / "recipe.json").write_text(json.dumps(meta0["recipe_spec"], indent=1))
    if (ckpt / "state.json").exists():
        state = json.loads((ckpt / "state.json").read_text())
        if (out / "recipe.json").exists():
            _check_resumable(recipe_from_dict(json.loads((out / "recipe.json").read_text())), recipe, state["step"])
        saved = json.loads((ckpt / "acs_model.json").read_text())["organism_config"]
        # Fields added to OrganismConfig later take their defaults in older checkpoints.
        if {**asdict(OrganismConfig()), **saved} != asdict(oc):
            raise ValueError(f"the checkpoint in {ckpt} is of another architecture ({saved}) than the recipe's")
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(ckpt)
        _trim_log(log_path, state["step"])
        print_fn(f"resuming at step {state['step']}")
    else:
        state = {"step": 0, "next_index": 0, "wall_s": 0.0, "stopped": None}
        model, processor = build_organism(oc, recipe.seed)
        log({"step": 0, "recipe": recipe.to_dict(),
             "parameters": sum(p.numel() for p in model.parameters())})
    (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1))
    set_input_size(processor, oc.input_width, oc.input_height)
    model.config.get_text_config()._attn_implementation = "sdpa"
    adapter = Qwen25VLAdapter(model, processor, "organism")
    if (ckpt / "acs_model.json").exists():  # the order the checkpoint was trained with, till a phase changes it
        adapter.query_order = json.loads((ckpt / "acs_model.json").read_text()).get("query_order", "image_first")
    print_fn(f"organism: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
             f"recipe {recipe.name!r}: {recipe.total_steps} steps in {len(recipe.phases)} phases")

    visual = [p for n, p in model.named_parameters() if ".visual." in f".{n}"]
    vis_ids = {id(p) for p in visual}
    text = [p for p in model.parameters() if id(p) not in vis_ids]
    opt = torch.optim.AdamW([{"params": text, "vision": False}, {"params": visual, "vision": True}],
                            lr=0.0, weight_decay=0.01, betas=(0.9, 0.98))
    if (ckpt / "optimizer.safetensors").exists():
        _load_opt(opt, model, ckpt / "optimizer.safetensors")
    # How much of the image reaches the language model (see probes._content): a tower that
    # collapses to one constant vector shows here first.
    vstats: list[float] = []
    model.model.visual.merger.register_forward_hook(lambda _m, _i, o: vstats.append(_content(o.detach().float())))

    batcher = Batcher(adapter, seed=recipe.seed, turns=recipe.turns)
    t_start, wall0 = time.time(), state["wall_s"]
    wall = lambda: wall0 + time.time() - t_start  # noqa: E731
    meta = lambda: {"model_id": "organism", "family": "qwen2.5-vl", "organism_config": asdict(oc),  # noqa: E731
                    "recipe": recipe.name, "recipe_spec": recipe.to_dict(), "steps": state["step"], "next_index": state["next_index"],
                    "wall_s": state["wall_s"], "query_order": adapter.query_order}

    def checkpoint(dest: Path = ckpt) -> None:
        # Written beside the old one and swapped in, so a kill mid-write loses nothing.
        state["wall_s"] = wall()
        new, old = dest.with_name(dest.name + ".new"), dest.with_name(dest.name + ".old")
        shutil.rmtree(new, ignore_errors=True)
        save_checkpoint(model, processor, new, meta())
        _save_opt(opt, model, new / "optimizer.safetensors")
        (new / "state.json").write_text(json.dumps(state))
        if dest.exists():
            dest.rename(old)
        new.rename(dest)
        shutil.rmtree(old, ignore_errors=True)

    def evaluate(premise: bool, phase, temperatures=None) -> dict | None:
        model.eval()
        t0 = time.time()
        rec = {"step": state["step"], "phase": phase.name, "eval": "shapes/calib greedy",
               **greedy_eval(adapter, "shapes", "calib", recipe.eval_n),
               "image_dependence": image_dependence(adapter),
               "query_dependence": query_dependence(adapter, n=recipe.eval_n)}
        if phase.max_objects:
            rec["curriculum_greedy"] = greedy_eval(adapter, "shapes", "calib", recipe.eval_n,
                                                   max_objects=phase.max_objects)
            if phase.max_objects >= 2:
                rec["curriculum_query_dependence"] = query_dependence(adapter, n=48, max_objects=phase.max_objects)
        result = None
        if premise:
            temps = temperatures or (recipe.temperature,)
            result = premise_eval(adapter, n=recipe.eval_n, temperatures=temps,
                                  num_candidates=recipe.premise_candidates)
            rec["premise"] = result
        rec["eval_s"] = round(time.time() - t0, 1)
        rec["wall_s"] = round(wall(), 1)
        log(rec)
        model.train()
        return result

    model.train()
    losses: list[float] = []
    cell_losses: list[float] = []  # `Phase.target_cells`, logged beside the answers' loss
    word_losses: list[float] = []  # `Phase.object_words`, the same
    pad = adapter.pad_token_id
    markers = [adapter.tokenizer(d, add_special_tokens=False)["input_ids"][-1] for d in ("0", "1")]
    # Looked up only when a phase names objects: each word must then be one token of the vocabulary.
    words = ((word_ids(adapter.tokenizer, COLOURS), word_ids(adapter.tokenizer, SHAPES))
             if any(p.object_words for p in recipe.phases) else None)
    while state["step"] < recipe.total_steps and not state.get("stopped"):
        step = state["step"]
        index, phase, k = recipe.phase_at(step)
        slow = carried_at(recipe, index, "rope_slow_pairs", oc.rope_slow_pairs)
        if slow_rotary(model, slow):  # entering a phase that re-times the rotary (no-op otherwise)
            log({"step": step, "phase": phase.name, "rotary": model.config.get_text_config().rope_parameters})
        order = carried_at(recipe, index, "query_order", "image_first")
        if order != adapter.query_order:  # evaluations and the exported model prompt as trained
            adapter.query_order = order
            log({"step": step, "phase": phase.name, "query_order": order})
        batcher.turns = phase.turns or recipe.turns
        batcher.max_objects, batcher.size_mix, batcher.confusers = phase.max_objects, phase.size_mix, phase.confusers
        batcher.ask_share, batcher.detect_share = phase.ask_share, phase.detect_share
        batcher.rng.seed(recipe.seed * 1_000_003 + step)  # the same queries after a resume
        enc, answers, nxt, targets, objects = batcher.batch(state["next_index"], recipe.batch_size)
        inputs, labels = training_inputs(enc, answers, pad)
        if visual and visual[0].requires_grad != phase.train_vision:  # a frozen tower needs no backward
            for p in visual:
                p.requires_grad_(phase.train_vision)
        lr = phase.lr_at(k)
        if "rewarm_from" in state:
            # Fresh Adam moments make the first updates sign-like (about lr per weight, whatever
            # the gradient's scale); a short ramp keeps that from jolting trained weights.
            lr *= min(1.0, (step - state["rewarm_from"] + 1) / REWARM_STEPS)
        for g in opt.param_groups:
            g["lr"] = (lr * phase.vision_lr_scale if phase.train_vision else 0.0) if g["vision"] \
                else lr * phase.text_lr_scale
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16_autocast):
            res = model(**inputs, output_hidden_states=bool(phase.target_cells or phase.object_words))
        logits = res.logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        if phase.target_cells:
            cells = target_cell_loss(model, res.hidden_states, enc, targets, markers)
            cell_losses.append(cells.item())
            loss = loss + phase.target_cells * cells
        if phase.object_words:
            named = object_word_loss(model, res.hidden_states, enc, objects, *words, layer=phase.object_words_layer)
            word_losses.append(named.item())
            loss = loss + phase.object_words * named
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        state["step"], state["next_index"] = step + 1, nxt
        s = state["step"]
        if s % LOG_EVERY == 0:
            rec = {"step": s, "phase": phase.name, "loss": round(sum(losses) / len(losses), 5), "lr": lr,
                   "vision_content": round(sum(vstats) / max(1, len(vstats)), 4), "wall_s": round(wall(), 1)}
            if cell_losses:  # `loss` is the answers' cross-entropy plus the weighted cell loss
                rec["target_cells_loss"] = round(sum(cell_losses) / len(cell_losses), 5)
            if word_losses:
                rec["object_words_loss"] = round(sum(word_losses) / len(word_losses), 5)
            log(rec)
            losses.clear()
            cell_losses.clear()
            word_losses.clear()
            vstats.clear()
        phase_done = s == recipe.phase_end(index)
        # The run's last step is evaluated once, by the final comparison of temperatures below.
        premise = (phase_done or s % recipe.premise_every == 0) and s < recipe.total_steps
        if premise or (s % recipe.eval_every == 0 and s < recipe.total_steps):
            result = evaluate(premise, phase)
            if result is not None and recipe.stop.met(result[str(recipe.temperature)]):
                state["stopped"] = f"stop bars met on calib at step {s}"
                log({"step": s, "stopped": state["stopped"]})
        if phase_done or state.get("stopped") or s % recipe.ckpt_every == 0:
            checkpoint()
        if phase_done:
            checkpoint(out / "phases" / phase.name)
        timed_out = max_minutes and time.time() - t_start > max_minutes * 60
        if (timed_out or s == until_step) and s < recipe.total_steps:
            checkpoint()
            print_fn(f"stopping at step {s} ({'the wall-time limit' if timed_out else 'until'}); "
                     f"rerun the same command to resume")
            return state

    if (state.get("final") or {}).get("step") != state["step"]:
        # Once per run, the shipped temperature is chosen on calib.
        _, phase, _ = recipe.phase_at(max(0, state["step"] - 1))
        result = evaluate(True, phase, temperatures=recipe.final_temperatures)
        state["final"] = {"temperature": choose_temperature(result), "step": state["step"]}
        log({"step": state["step"], "final": state["final"]})
        checkpoint()
    return state
