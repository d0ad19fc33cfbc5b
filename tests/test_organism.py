"""The organism's training batches: multi-turn conversations whose labels are exactly the answers."""

from pipeline.organism import Batcher, training_inputs


def test_multi_turn_labels_are_the_answers_and_first_turn_is_the_inference_prompt(tiny_adapter):
    ad = tiny_adapter
    b = Batcher(ad, turns=3, seed=0)
    enc, conts, nxt, *_ = b.batch(0, 2)
    assert nxt >= 2
    inputs, labels = training_inputs(enc, conts, ad.pad_token_id)
    tok = ad.tokenizer
    for i, segs in enumerate(conts):
        n_answers = sum(lab for _, lab in segs)
        assert 1 <= n_answers <= 3
        # The labelled tokens, decoded, are the answers in order, each closed by <|im_end|>.
        lab = labels[i][labels[i] != -100].tolist()
        text = tok.decode(lab, skip_special_tokens=False)
        assert text.count('"bbox_2d"') == n_answers
        assert text.count("<|im_end|>") == n_answers
        assert "user" not in text and "Detect" not in text
        # The full sequence holds one user turn per answer; the prompt part is untouched.
        full = tok.decode(inputs["input_ids"][i][inputs["attention_mask"][i].bool()].tolist(), skip_special_tokens=False)
        assert full.count("<|im_start|>user") == n_answers
        assert full.count("<|image_pad|>") == int(enc.inputs["image_grid_thw"][i].prod()) // 4
    # Labels sit on the answers only: the prompt columns are all -100.
    assert (labels[:, : enc.inputs["input_ids"].shape[1]] == -100).all()


def test_single_turn_answer_ids_still_accepted(tiny_adapter):
    ad = tiny_adapter
    enc, conts, *_ = Batcher(ad, turns=1, seed=1).batch(0, 2)
    plain = [[t for seg, _ in c for t in seg] for c in conts]
    a, la = training_inputs(enc, conts, ad.pad_token_id)
    b, lb = training_inputs(enc, plain, ad.pad_token_id)
    assert (la == lb).all() and (a["input_ids"] == b["input_ids"]).all()


def test_image_dependence_swaps_images_and_restores_them(tiny_adapter):
    import math

    import torch

    from pipeline.organism.probes import image_dependence

    torch.manual_seed(0)
    res = image_dependence(tiny_adapter, n=2)
    assert math.isfinite(res["coord_ce_own_image"]) and math.isfinite(res["coord_ce_other_image"])
    # Random weights still look at the pixels a little: swapping the images changes the loss.
    assert res["gap"] != 0.0
    assert res["gap"] == res["coord_ce_other_image"] - res["coord_ce_own_image"]
    # A freshly initialised tower sends tokens that differ across the image (not one constant vector).
    assert res["visual_token_norm"] > 0 and 0.1 < res["visual_content"] < 100
    # Deterministic and side-effect free: the same call gives the same numbers.
    assert image_dependence(tiny_adapter, n=2) == res


def test_image_dependence_reports_the_four_coordinates(tiny_adapter):
    import pytest

    from pipeline.organism.probes import image_dependence

    res = image_dependence(tiny_adapter, n=2, max_objects=1)
    per = res["gap_per_coordinate"]
    assert list(per) == ["x1", "y1", "x2", "y2"]
    # The mean gap is the mean of the four coordinates' gaps: the "2" of "bbox_2d" is not one.
    assert sum(per.values()) / 4 == pytest.approx(res["gap"], abs=1e-3)


TINY = {"name": "tiny", "batch_size": 2, "turns": 2, "ckpt_every": 1, "eval_every": 2, "eval_n": 2,
        "premise_every": 100, "premise_candidates": 2, "final_temperatures": [0.7, 1.0],
        "model": {"text_hidden": 64, "text_layers": 2, "text_heads": 2, "text_kv_heads": 1, "text_ffn": 128,
                  "vision_hidden": 32, "vision_depth": 2, "vision_heads": 2, "vision_ffn": 64,
                  "input_width": 112, "input_height": 84},
        "phases": [{"name": "read", "steps": 2, "lr": 0.001, "max_objects": 1, "train_vision": False},
                   {"name": "tower", "steps": 2, "lr": 0.001, "vision_lr_scale": 0.3}]}


def _tiny(**changes):
    import copy

    from pipeline.organism.recipe import recipe_from_dict

    d = copy.deepcopy(TINY)
    for k, v in changes.items():
        d[k] = v
    return recipe_from_dict(d)


def test_committed_recipes_load_and_schedule():
    import json

    from pipeline.organism.recipe import RECIPES, cut_short, load_recipe, same_settings, shared_prefix

    names = sorted(p.stem for p in RECIPES.glob("*.json"))
    assert "organism-v2" in names
    # Every committed recipe resolves (variants through their bases) and forks from its base's run.
    for n in names:
        spec = json.loads((RECIPES / f"{n}.json").read_text())
        r = load_recipe(n)
        assert r.name == n
        if "extends" in spec:
            base = load_recipe(spec["extends"])
            branch = spec.get("branch_at")
            i = [p.name for p in base.phases].index(branch["phase"]) if branch else len(base.phases)
            assert r.phases[:i] == base.phases[:i]
            assert len(r.phases) == i + bool(branch) + len(spec.get("phases", []))
            if branch:
                assert cut_short(base.phases[i], r.phases[i])
            # A variant that keeps the base's model and batch can start from the base's run.
            assert shared_prefix(base, r) == (i if same_settings(base, r) else 0)
    r = load_recipe("organism-v2")
    assert r.total_steps == sum(p.steps for p in r.phases) and not r.phases[0].train_vision
    assert r.eval_n >= 96  # the floor for a stable evaluation
    # Phase lookup and the per-phase schedule: warm-up, peak, cosine down to min_lr_frac.
    first = r.phases[0]
    assert r.phase_at(0)[1] is first and r.phase_at(first.steps)[0] == 1
    assert r.phase_at(r.total_steps + 5)[0] == len(r.phases) - 1
    assert first.lr_at(0) == first.lr / first.warmup and first.lr_at(first.warmup) == first.lr
    assert abs(first.lr_at(first.steps) - first.lr * first.min_lr_frac) < 1e-12


def test_recipe_errors_name_the_problem(tmp_path):
    import json

    import pytest

    from pipeline.organism.recipe import load_recipe, recipe_from_dict

    with pytest.raises(ValueError, match="unknown key.*'stpes'"):
        recipe_from_dict({**TINY, "phases": [{"name": "a", "stpes": 3, "lr": 1e-3}]})
    with pytest.raises(ValueError, match="unique 'name'"):
        recipe_from_dict({**TINY, "phases": [TINY["phases"][0], TINY["phases"][0]]})
    with pytest.raises(ValueError, match="model.*'width'"):
        recipe_from_dict({**TINY, "model": {"width": 3}})
    with pytest.raises(FileNotFoundError, match="organism-v2"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "r.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_recipe(bad)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(TINY))
    assert load_recipe(ok).name == "tiny"


def test_a_variant_extends_its_base_by_the_phases_it_appends(tmp_path):
    import json

    import pytest

    from pipeline.organism.recipe import RECIPES, load_recipe, shared_prefix

    (tmp_path / "base.json").write_text(json.dumps(TINY))
    (tmp_path / "var.json").write_text(json.dumps({
        "name": "var", "extends": "base", "eval_n": 4, "stop": {"room_small": 0.15},
        "phases": [{"name": "more", "steps": 3, "lr": 5e-4, "confusers": "colour"}]}))
    base, var = load_recipe(tmp_path / "base.json"), load_recipe(tmp_path / "var.json")
    assert [p.name for p in var.phases] == ["read", "tower", "more"] and var.phases[2].confusers == "colour"
    assert var.phases[:2] == base.phases and shared_prefix(base, var) == 2  # so it can fork from the base's run
    # Keys it names replace the base's whole (stop is not merged); the rest are the base's.
    assert (var.name, var.eval_n, var.stop.room_small, var.stop.greedy_large) == ("var", 4, 0.15, None)
    assert (var.batch_size, var.model, var.final_temperatures) == (2, base.model, (0.7, 1.0))

    # Branching off mid-phase: the base's phases end with that one cut short on its own schedule.
    (tmp_path / "mid.json").write_text(json.dumps({"name": "mid", "extends": "base.json",
                                                   "branch_at": {"phase": "read", "steps": 1}}))
    mid = load_recipe(tmp_path / "mid.json")
    assert [(p.name, p.steps, p.schedule_steps) for p in mid.phases] == [("read", 1, 2)]
    assert mid.phases[0].lr_at(0) == base.phases[0].lr_at(0)
    for at, msg in [({"phase": "nope", "steps": 1}, "no phase 'nope'"),
                    ({"phase": "read", "steps": 5}, "1 to the phase's 2"), ({"phase": "read"}, "branch_at")]:
        (tmp_path / "bad.json").write_text(json.dumps({"name": "bad", "extends": "base", "branch_at": at}))
        with pytest.raises(ValueError, match=msg):
            load_recipe(tmp_path / "bad.json")

    (tmp_path / "a.json").write_text(json.dumps({"name": "a", "extends": "b"}))
    (tmp_path / "b.json").write_text(json.dumps({"name": "b", "extends": "a"}))
    with pytest.raises(ValueError, match="cycle"):
        load_recipe(tmp_path / "a.json")
    (tmp_path / "orphan.json").write_text(json.dumps({"name": "o", "extends": "no-such-base"}))
    with pytest.raises(FileNotFoundError, match="no-such-base"):
        load_recipe(tmp_path / "orphan.json")
    (tmp_path / "nameless.json").write_text(json.dumps({"extends": "base"}))
    with pytest.raises(ValueError, match="own 'name'"):
        load_recipe(tmp_path / "nameless.json")

    # The committed lineage: each variant is its base's recipe and one phase more.
    words, long_, match = (load_recipe(f"organism-v2-textfirst-{n}") for n in ("words", "words-long", "words-match"))
    assert long_.phases[:-1] == words.phases and match.phases[:-1] == long_.phases
    assert (match.phases[-1].name, match.phases[-1].confusers, match.name) == (
        "match", "colour", "organism-v2-textfirst-words-match")
    assert "extends" in json.loads((RECIPES / "organism-v2-textfirst-words-match.json").read_text())


def test_phase_size_mix_validated_and_compared_as_a_tuple():
    import pytest

    from pipeline.organism.recipe import Phase, load_recipe, recipe_from_dict, shared_prefix

    p = Phase("a", 3, 1e-3, size_mix=[0.7, 0.2, 0.1])
    assert p.size_mix == (0.7, 0.2, 0.1) and p == Phase("a", 3, 1e-3, size_mix=(0.7, 0.2, 0.1))
    for bad in ([0.5, 0.5], [0.7, 0.2, 0.2], [1.2, -0.1, -0.1]):
        with pytest.raises(ValueError, match="size_mix"):
            Phase("a", 3, 1e-3, size_mix=bad)
    # the small-heavy variant shares the first two phases with the shipped recipe and differs in
    # the third only by its size mix (what the side-by-side comparison tests)
    a, b = load_recipe("organism-v2"), load_recipe("organism-v2-small")
    assert shared_prefix(a, b) == 2 and b.phases[2].size_mix == (0.7, 0.2, 0.1)
    assert recipe_from_dict(b.to_dict()) == b  # the run directory's recipe.json reads back equal


def test_stop_bars():
    from pipeline.organism.recipe import Stop

    p = {"greedy": {"large": {"acc50": 0.9}, "small": {"acc50": 0.3}}, "oracle_room_small": 0.1}
    assert Stop(greedy_large=0.85, greedy_small=0.25).met(p)
    assert not Stop(greedy_large=0.85, greedy_small=0.25, room_small=0.15).met(p)
    assert not Stop().met(p)  # no bars: never stops early


def test_train_recipe_resumes_forks_and_makes_its_card(tmp_path):
    """The recipe loop on a tiny organism: a stop mid-run (as a kill would) and a resume finish
    the recipe; the tower is frozen exactly in the phase that says so; phase snapshots let a
    variant start at a boundary; a rewrite of trained phases is refused; the card's tables come
    from the log; an exported checkpoint continues the recipe."""
    import json

    import pytest
    import torch
    from safetensors.torch import load_file

    from pipeline.organism.card import compare_table, model_card
    from pipeline.organism.model import export_organism
    from pipeline.organism.train import train

    out = tmp_path / "run"
    recipe = _tiny()
    state = train(recipe, out, threads=2, until_step=1, print_fn=lambda s: None)
    assert state["step"] == 1 and not state.get("final")
    w1 = load_file(str(out / "ckpt" / "model.safetensors"))
    # A run killed after its checkpoint has logged steps it will train again: they are dropped.
    with (out / "train_log.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "phase": "read", "loss": 9.9, "wall_s": 1.0}) + "\n")
    printed = []
    state = train(recipe, out, threads=2, print_fn=printed.append)
    assert "resuming at step 1" in printed
    assert '"loss": 9.9' not in (out / "train_log.jsonl").read_text()
    assert state["step"] == 4 and state["final"]["temperature"] in (0.7, 1.0)
    w2 = load_file(str(out / "phases" / "read" / "model.safetensors"))
    w4 = load_file(str(out / "ckpt" / "model.safetensors"))
    vis = [k for k in w1 if k.startswith("visual.")]
    assert vis and all(torch.equal(w1[k], w2[k]) for k in vis)  # frozen in "read"
    assert any(not torch.equal(w2[k], w4[k]) for k in vis)  # trains in "tower"
    assert any(not torch.equal(w1[k], w2[k]) for k in w1 if not k.startswith("visual."))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if r.get("eval")]
    assert [r["step"] for r in evals] == [2, 4]  # every eval_every, phase ends; the last is the final one
    assert "premise" in evals[0] and list(evals[-1]["premise"]) == ["0.7", "1.0"]
    assert evals[0]["curriculum_greedy"]["all"]["n"] == 2 and "curriculum_greedy" not in evals[-1]

    # A recipe that rewrites a trained phase is refused; one that extends the last phase runs on.
    changed = _tiny(phases=[{**TINY["phases"][0], "lr": 0.002}, TINY["phases"][1]])
    with pytest.raises(ValueError, match="changes phases already trained"):
        train(changed, out, print_fn=lambda s: None)
    longer = _tiny(phases=[TINY["phases"][0], {**TINY["phases"][1], "steps": 3}])
    assert train(longer, out, threads=2, print_fn=lambda s: None)["step"] == 5

    # A variant forks from the end of the shared phase instead of training it again.
    variant = _tiny(name="tiny-1x", phases=[TINY["phases"][0], {**TINY["phases"][1], "vision_lr_scale": 1.0}])
    vout = tmp_path / "variant"
    msgs = []
    assert train(variant, vout, threads=2, fork_from=out, print_fn=msgs.append)["step"] == 4
    assert any("forked from" in m and "at step 2" in m for m in msgs)
    vlog = (vout / "train_log.jsonl").read_text()
    assert '"forked_from"' in vlog and vlog.count('"eval"') == 2  # step 2 (copied) and its own step 4
    # Side by side: the shared step-2 evaluation is one row per run only where they differ.
    table = compare_table([out, vout])
    assert "| 4 | tiny |" in table and "| 4 | tiny-1x |" in table and "| 2 |" not in table

    # The card's tables are the log's numbers.
    card = model_card(out)
    assert "| read | 0-2 |" in card and "| tower | 2-5 |" in card
    assert f"**T = {json.loads((out / 'ckpt' / 'state.json').read_text())['final']['temperature']:g}**" in card

    # Export, then continue the recipe from the exported weights (fresh optimizer moments).
    asset = tmp_path / "asset"
    export_organism(out / "ckpt", asset, card=card, run_dir=out)
    meta = json.loads((asset / "acs_model.json").read_text())
    assert meta["steps"] == 5 and meta["recipe_spec"]["name"] == "tiny" and (asset / "train_log.jsonl").exists()
    # The temperature chosen on calib for step 5 ships with it; `acs label` samples at it by default.
    from pipeline.assets import default_temperature

    final = json.loads((out / "ckpt" / "state.json").read_text())["final"]
    assert final["step"] == 5 and meta["temperature"] == final["temperature"]
    assert default_temperature(str(asset), None) == final["temperature"] and default_temperature(str(asset), 0.3) == 0.3
    assert default_temperature(str(tmp_path), None) == 1.0  # no acs_model.json: the sampler's default
    more = _tiny(phases=[TINY["phases"][0], {**TINY["phases"][1], "steps": 4}])
    cont = tmp_path / "cont"
    assert train(more, cont, threads=2, init_from=asset, print_fn=lambda s: None)["step"] == 6
    assert any(json.loads(line).get("init_from") for line in (cont / "train_log.jsonl").read_text().splitlines())


def test_a_text_first_phase_trains_evaluates_and_exports_its_query_order(tmp_path, monkeypatch):
    """A phase that moves the query before the image: the switch is logged once (not again on a
    resume), the checkpoint and the export record it, and the exported model loads prompting so."""
    import json

    import pytest

    from pipeline.models.base import load_adapter
    from pipeline.organism.model import export_organism
    from pipeline.organism import train as train_module
    from pipeline.organism.train import train

    monkeypatch.setattr(train_module, "LOG_EVERY", 1)  # a loss line every step
    recipe = _tiny(phases=[TINY["phases"][0], {**TINY["phases"][1], "query_order": "text_first", "turns": 1,
                                               "target_cells": 0.5, "object_words": 0.5}])
    out = tmp_path / "run"
    assert train(recipe, out, threads=2, until_step=3, print_fn=lambda s: None)["step"] == 3
    assert json.loads((out / "ckpt" / "acs_model.json").read_text())["query_order"] == "text_first"
    assert json.loads((out / "phases" / "read" / "acs_model.json").read_text())["query_order"] == "image_first"
    train(recipe, out, threads=2, print_fn=lambda s: None)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["query_order"]) for r in log if "query_order" in r and "eval" not in r] == [(2, "text_first")]
    # Both auxiliary losses are logged, in the second phase's steps only.
    aux = [(r["step"], "target_cells_loss" in r, "object_words_loss" in r) for r in log if "loss" in r]
    assert aux == [(s, s > 2, s > 2) for s in range(1, recipe.total_steps + 1)]
    assert all(0 < r["object_words_loss"] < 10 for r in log if "object_words_loss" in r)
    asset = tmp_path / "asset"
    export_organism(out / "ckpt", asset, run_dir=out)
    ad = load_adapter(str(asset), device="cpu")
    assert ad.query_order == "text_first" and ad.messages("red circle")[0]["content"][0]["type"] == "text"
    meta = json.loads((asset / "acs_model.json").read_text())
    (asset / "acs_model.json").write_text(json.dumps({**meta, "query_order": "query_last"}))
    with pytest.raises(ValueError, match="query_order 'query_last'"):
        load_adapter(str(asset), device="cpu")


def test_interrupted_checkpoint_swap_recovers(tmp_path):
    from pipeline.organism.train import _recover

    ckpt = tmp_path / "ckpt"
    new = tmp_path / "ckpt.new"
    new.mkdir()
    (new / "state.json").write_text("{}")
    _recover(ckpt)  # killed after the old one moved away, before the new one moved in
    assert (ckpt / "state.json").exists() and not new.exists()
    half = tmp_path / "ckpt.new"
    half.mkdir()  # killed mid-write: no state.json yet
    _recover(ckpt)
    assert (ckpt / "state.json").exists() and not half.exists()


def test_train_organism_cli_errors(tmp_path):
    import pytest

    from jobs.train_organism import main

    with pytest.raises(SystemExit, match="no recipe"):
        main(["--recipe", "nope", "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="has no checkpoint"):
        main(["--out", str(tmp_path / "r"), "--export", str(tmp_path / "e")])


def test_organism_reads_scenes_unresized_and_resizes_other_images_like_qwen():
    """The v2 geometry: patch 14, 2x2 merge, the scene size as the processor's only size (12 x 9
    visual tokens); an image of another size goes through the processor's own smart resize, as
    the real Qwen2.5-VL processor would treat it."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from pipeline.models.tokenizer import build_tokenizer
    from pipeline.organism.model import OrganismConfig, organism_configs
    from pipeline.organism.scenes import HEIGHT, WIDTH

    oc = OrganismConfig()
    assert (oc.patch_size, oc.input_width, oc.input_height) == (14, WIDTH, HEIGHT)
    config, processor = organism_configs(oc, build_tokenizer())
    assert config.vision_config.patch_size == 14 and config.vision_config.spatial_merge_size == 2
    ip = processor.image_processor
    for size in [(WIDTH, HEIGHT), (640, 480), (500, 300), (90, 400)]:
        thw = ip(images=[Image.new("RGB", size)], return_tensors="pt")["image_grid_thw"][0].tolist()
        h, w = smart_resize(size[1], size[0], factor=28, min_pixels=WIDTH * HEIGHT, max_pixels=WIDTH * HEIGHT)
        assert thw == [1, h // 14, w // 14]
        if size == (WIDTH, HEIGHT):  # the scenes themselves: exactly 12 x 9 tokens, no resize
            assert (h, w) == (HEIGHT, WIDTH) and thw == [1, 18, 24]
        # (640x480 lands on 336x224, not 336x252: smart_resize floors 480 / 1.905 / 28 = 8.999...)


def test_premise_table_keeps_one_row_per_step_and_temperature(tmp_path):
    """ship.sh measures the shipped step's premise again after the recipe's own final one: the
    card lists each (step, T) once, with the last measurement."""
    import json

    from pipeline.organism.card import premise_table

    def prem(acc):
        b = {k: {"acc50": acc, "miou": acc} for k in ("small", "medium", "large", "all")}
        return {"greedy": b, "oracle": b, "oracle_room_small": 0.0, "no_box_share_sampled": 0.0,
                "best_head_spearman": 0.0, "median_head_spearman": 0.0}

    log = [{"step": 10, "premise": {"1.0": prem(0.1)}},
           {"step": 20, "premise": {"0.7": prem(0.2), "1.0": prem(0.3)}},
           {"step": 20, "premise": {"0.7": prem(0.4), "1.0": prem(0.5)}}]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    rows = [r for r in premise_table(tmp_path).splitlines()[2:]]
    assert [r.split(" | ")[:3] for r in rows] == [["| 10", "1.0", "0.10 / 0.10 / 0.10"],
                                                  ["| 20", "0.7", "0.40 / 0.40 / 0.40"],
                                                  ["| 20", "1.0", "0.50 / 0.50 / 0.50"]]
