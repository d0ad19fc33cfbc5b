"""Query binding: where an answer landed among the scene's objects, how much the answer depends on
the query, confusable scenes for training and probes, and the rotary layout that leaves channels
free of image position."""

import math

import numpy as np
import pytest

from pipeline.metrics import OUTCOMES, answer_outcomes, outcome_table
from pipeline.organism import scenes as S


def test_answer_outcomes_in_priority_order():
    target = [[0, 0, 10, 10]] * 7
    pred = [[0, 0, 10, 10],       # right
            [0, 0, 10, 6],        # IoU 0.6 with the target: right, although it also covers the other
            [20, 20, 30, 30],     # on another category's object
            [40, 40, 50, 50],     # on another instance of the query's category
            [0, 6, 10, 10],       # IoU 0.4 with the target, nothing else: near
            [100, 100, 110, 110],  # nowhere
            [np.nan] * 4]         # no box
    others = [[[20, 20, 30, 30], [0, 0, 10, 6]]] * 7
    same = [[[40, 40, 50, 50]]] * 7
    got = answer_outcomes(pred, target, others, same).tolist()
    assert got == ["right", "right", "other_object", "other_instance", "near", "nowhere", "no_box"]
    # Without the same-category list, that answer sits on nothing known: nowhere.
    assert answer_outcomes(pred, target, others)[3] == "nowhere"
    # An answer on another object beats "near": it boxed that object, not the target badly.
    assert answer_outcomes([[0, 0, 12, 12]], [[0, 0, 5, 5]], [[[1, 1, 12, 12]]])[0] == "other_object"
    with pytest.raises(ValueError, match="lists of other objects"):
        answer_outcomes(pred, target, others[:2])


def test_outcome_table_counts_per_bucket():
    t = outcome_table(["right", "other_object", "right", "no_box"], ["small", "small", "large", "large"])
    assert t["small"] == {**{o: 0 for o in OUTCOMES}, "right": 1, "other_object": 1, "n": 2}
    assert t["large"]["right"] == 1 and t["large"]["no_box"] == 1 and t["medium"]["n"] == 0
    assert t["all"]["right"] == 2 and t["all"]["n"] == 4


def test_scene_queries_list_every_other_object():
    items = S.scene_queries("shapes", "calib", 12)
    assert [(q.query_id, a) for q, a, _ in items] == [(q.query_id, a) for q, a in S.grounding_queries("shapes", "calib", 12)]
    q, _, others = items[0]
    scene = S.make_scene("shapes", "calib", int(q.query_id.split("-")[-1].split(":")[0]))
    boxes = sorted((x, y, x + w, y + h) for x, y, w, h in (o.bbox for o in scene.objects))
    assert sorted([q.gt, *others]) == boxes and q.gt not in others


@pytest.mark.parametrize("share", ["colour", "shape"])
def test_confusers_share_one_attribute_and_leave_the_splits_alone(share):
    k = 0 if share == "colour" else 1
    for i in range(30):
        cats = [o.category for o in S.make_scene("shapes", "train", i, confusers=share).objects]
        first = cats[0].split(" ")
        # Every other object shares that attribute with one object and differs in the other
        # (a repeated category, the benchmark's invalid query, may still occur).
        assert all(c.split(" ")[k] == first[k] for c in cats)
    n_conf = 0
    for i in range(60):
        cats = {o.category for o in S.make_scene("shapes", "train", i, confusers=1.0).objects}
        cols, shapes = {c.split(" ")[0] for c in cats}, {c.split(" ")[1] for c in cats}
        n_conf += len(cols) < len(cats) or len(shapes) < len(cats)
    assert n_conf == 60
    # Unset, nothing is drawn: the published splits are byte-for-byte what they were.
    a, b = S.make_scene("shapes", "calib", 7), S.make_scene("shapes", "calib", 7, confusers=None)
    assert a.objects == b.objects and a.image.tobytes() == b.image.tobytes()
    assert S.make_scene("shapes", "train", 4, confusers=0.5).objects == S.make_scene("shapes", "train", 4, confusers=0.5).objects
    with pytest.raises(ValueError, match="confusers"):
        S.make_scene("shapes", "train", 0, confusers="size")


def test_phase_confusers_validated():
    from pipeline.organism.recipe import Phase

    assert Phase("p", 1, 1e-3, confusers=0.5).confusers == 0.5
    assert Phase("p", 1, 1e-3, confusers="colour").confusers == "colour"
    for bad in (1.5, "size"):
        with pytest.raises(ValueError, match="confusers"):
            Phase("p", 1, 1e-3, confusers=bad)
    # Every training scene of a "colour" phase shares one colour: only the shape word tells its
    # objects apart (the batcher hands the setting to make_scene; it needs no model for that).
    from pipeline.organism import Batcher

    b = Batcher(None, confusers="colour")
    scenes = [ex[2] for ex in map(b.example, range(6)) if ex is not None]
    assert scenes and all(len({c.split(" ")[0] for c, _ in objs}) == 1 for objs in scenes)
    assert any(len(objs) > 1 for objs in scenes)


def test_mrope_section_configurable_and_checked():
    from pipeline.models.tokenizer import build_tokenizer
    from pipeline.organism.model import OrganismConfig, organism_configs

    tok = build_tokenizer()
    cfg, _ = organism_configs(OrganismConfig(), tok)
    assert cfg.text_config.rope_parameters["mrope_section"] == [4, 6, 6]  # the default: v2's layout
    cfg, _ = organism_configs(OrganismConfig(rope_theta=50.0, mrope_section=[2, 3, 11]), tok)
    assert cfg.text_config.rope_parameters["mrope_section"] == [2, 3, 11]
    assert cfg.text_config.rope_parameters["rope_theta"] == 50.0
    with pytest.raises(ValueError, match="head_dim / 2 = 16"):
        organism_configs(OrganismConfig(mrope_section=[4, 6, 5]), tok)


def test_rotary_table_counts_position_free_pairs(tiny_adapter):
    from pipeline.organism.binding import rotary_table

    r = rotary_table(tiny_adapter)
    cfg = tiny_adapter.model.config.get_text_config()
    sec = cfg.rope_parameters["mrope_section"]
    assert [len(r["rad_per_position"][k]) for k in "thw"] == list(sec)
    inv = [f for k in "thw" for f in r["rad_per_position"][k]]
    assert inv == sorted(inv, reverse=True) and inv[0] == 1.0  # t takes the highest frequencies
    assert r["pairs_free_of_image_position"] == sec[0] + sum(f < 0.1 for k in "hw" for f in r["rad_per_position"][k])


def test_query_dependence_swaps_only_the_category(tiny_adapter):
    import torch

    from pipeline.organism.probes import query_dependence

    torch.manual_seed(0)
    res = query_dependence(tiny_adapter, n=3)
    assert math.isfinite(res["coord_ce_right_query"]) and math.isfinite(res["coord_ce_swapped_query"])
    assert res["gap"] == pytest.approx(res["coord_ce_swapped_query"] - res["coord_ce_right_query"], abs=1e-5)
    assert list(res["gap_per_coordinate"]) == ["x1", "y1", "x2", "y2"]
    # Random weights read the prompt's words a little: another category changes the loss.
    assert res["gap"] != 0.0
    assert query_dependence(tiny_adapter, n=3) == res


def test_greedy_eval_reports_where_answers_landed(tiny_adapter):
    from pipeline.organism.probes import greedy_eval

    res = greedy_eval(tiny_adapter, "shapes", "calib", 4)
    oc = res["outcomes"]
    assert oc["all"]["n"] == 4 and sum(oc["all"][o] for o in OUTCOMES) == 4
    # "right" is Acc@0.5 counted another way.
    assert oc["all"]["right"] == round(res["all"]["acc50"] * 4)


def test_binding_probes_run_on_a_checkpoint(tiny_adapter):
    from pipeline.organism import binding

    tk = binding.tokenization(tiny_adapter)
    assert tk["distinct"] and set(tk["tokens"]) >= {"red", "circle", "white", "cross"}
    pairs = binding.pair_probe(tiny_adapter, n=2)
    for key in ("same_colour", "same_shape", "unconstrained"):
        p = pairs[key]
        assert p["n"] == 2 and sum(p[o] for o in ("right", "other_object", "near", "nowhere", "no_box")) == 2
    cfg = tiny_adapter.model.config
    impls = (cfg.get_text_config()._attn_implementation, cfg.vision_config._attn_implementation)
    att = binding.prompt_attention(tiny_adapter, n=2)
    # The shared model is left as it was found (other tests rely on its attention implementations).
    assert (cfg.get_text_config()._attn_implementation, cfg.vision_config._attn_implementation) == impls
    layers = tiny_adapter.model.config.get_text_config().num_hidden_layers
    assert len(att["layers"]) == layers
    for row in att["layers"]:
        # Shares of one softmax row over the real tokens: they sum to 1; both words are found.
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-3)
        assert row["colour_word"] > 0 and row["shape_word"] > 0 and row["image"] > 0
    lp = binding.linear_probe(tiny_adapter, n_scenes=8, layers=(1,))
    assert lp["objects"] >= 16 and 0 <= lp["tower"]["colour"] <= 1 and 0 <= lp["lm_layer_1"]["shape"] <= 1
    assert set(lp) == {"objects", "chance", "tower", "tower_object_mean", "lm_layer_1"}


def test_naming_probe_counts_every_visible_object_once_per_word(tiny_adapter):
    from pipeline.organism.binding import naming_probe
    from pipeline.organism.scenes import make_scene

    res = naming_probe(tiny_adapter, n_scenes=6, layers=(0, 2))
    objects = sum(len(make_scene("shapes", "calib", i).objects) for i in range(6))
    for layer in ("layer_0", "layer_2"):
        got = res[layer]
        for word in ("colour", "shape"):
            buckets = [v for k, v in got.items() if k.startswith(word + "/") and k != word + "/all"]
            assert sum(b["n"] for b in buckets) == got[word + "/all"]["n"]
            # every object once, less any wholly covered by the objects drawn over it
            assert objects - 2 <= got[word + "/all"]["n"] <= objects
            assert all(0 <= b["acc"] <= 1 for b in buckets)
    assert res["chance"] == {"colour": 1 / 8, "shape": 1 / 6}


def test_ask_turns_name_the_object_at_a_box(tiny_adapter):
    from pipeline.organism import Batcher, training_inputs
    from pipeline.organism.batcher import ask_prompt

    ad = tiny_adapter
    plain = Batcher(ad, turns=3, seed=0).batch(0, 4)[1]
    enc, conts, *_ = Batcher(ad, turns=3, seed=0, ask_share=1.0).batch(0, 4)
    tok = ad.tokenizer
    asked = 0
    for segs, base in zip(conts, plain):
        # The first turn is untouched: the inference prompt's box answer.
        assert segs[0] == base[0]
        for k in range(1, len(segs) // 2 + 1):
            user, answer = tok.decode(segs[2 * k - 1][0]), tok.decode(segs[2 * k][0], skip_special_tokens=True)
            assert "What is at [" in user and "bbox_2d" not in answer
            asked += 1
            # The answer is the category of the object whose box the question gives.
            cat_turn = base[2 * k][0]
            assert answer.strip() in tok.decode(cat_turn)
            assert segs[2 * k][1] and not segs[2 * k - 1][1]
    assert asked >= 2
    inputs, labels = training_inputs(enc, conts, ad.pad_token_id)
    assert (labels != -100).sum() > 0
    assert ask_prompt((1.4, 2, 30.6, 40)) == "What is at [1, 2, 31, 40] in the image? Answer with its name."


def test_a_phase_ended_early_keeps_its_schedule_and_can_be_branched_from():
    import dataclasses
    import json
    from pathlib import Path

    from pipeline.organism.recipe import Phase, cut_short, load_recipe
    from pipeline.organism.train import _check_resumable

    full = Phase("scenes", 1800, 7e-4, warmup=10)
    cut = Phase("scenes", 1280, 7e-4, warmup=10, schedule_steps=1800)
    # The steps it trained keep their learning rates: the recipe reruns exactly.
    assert [cut.lr_at(k) for k in (0, 5, 600, 1279)] == [full.lr_at(k) for k in (0, 5, 600, 1279)]
    assert cut_short(full, cut) and not cut_short(full, Phase("scenes", 1280, 7e-4, warmup=10))
    assert not cut_short(full, Phase("scenes", 1280, 7e-4, warmup=10, schedule_steps=1800, max_objects=3))
    v2, bind = load_recipe("organism-v2"), load_recipe("organism-v2-bind")
    # The shipped step 2,480 ends v2's scenes phase early; the binding variants branch off there.
    _check_resumable(v2, bind, 2480)
    with pytest.raises(ValueError, match="changes phases already trained"):
        _check_resumable(v2, bind, 2400)  # the cut is not where the run is
    with pytest.raises(ValueError, match="changes phases already trained"):
        _check_resumable(bind, v2, 2600)  # bind's phase was trained: v2 would rewrite it
    ctl = load_recipe("organism-v2-bind-control")
    # The two variants differ only in the binding phase's data.
    diff = {k for k, v in bind.phases[3].__dict__.items() if ctl.phases[3].__dict__[k] != v}
    assert diff == {"confusers", "ask_share"} and bind.phases[:3] == ctl.phases[:3]
    # Its file says only that: v2 branched off at step 1,280 of scenes, one phase appended.
    spec = json.loads(Path("pipeline/organism/recipes/organism-v2-bind.json").read_text())
    assert (spec["extends"], spec["branch_at"], spec["phases"][0]["confusers"]) == (
        "organism-v2", {"phase": "scenes", "steps": 1280}, 0.5)
    assert bind.phases[2] == dataclasses.replace(v2.phases[2], steps=1280, schedule_steps=1800)


def test_phase_ask_share_validated():
    from pipeline.organism.recipe import Phase

    with pytest.raises(ValueError, match="ask_share"):
        Phase("p", 1, 1e-3, ask_share=-0.1)


def test_slowed_rotary_pairs_are_exactly_the_slowest_and_survive_a_save(tmp_path):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pipeline.organism.model import SLOW_FACTOR, OrganismConfig, build_organism, slow_rotary

    model, _ = build_organism(OrganismConfig(text_layers=1, vision_depth=2))
    plain = model.model.language_model.rotary_emb.inv_freq.clone()
    assert slow_rotary(model, 0) is False  # already plain
    assert slow_rotary(model, 2) is True and slow_rotary(model, 2) is False
    inv = model.model.language_model.rotary_emb.inv_freq
    ratio = (plain / inv).tolist()
    assert ratio[:-2] == pytest.approx([1.0] * (len(ratio) - 2)) and ratio[-2:] == pytest.approx([SLOW_FACTOR] * 2)
    # The change is in the config: a saved checkpoint loads with the same frequencies, through
    # transformers' own `llama3` rope type (no custom code at inference).
    model.save_pretrained(tmp_path)
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    assert back.config.get_text_config().rope_parameters["rope_type"] == "llama3"
    assert torch.allclose(back.model.language_model.rotary_emb.inv_freq, inv)
    assert slow_rotary(back, 0) is True
    assert torch.allclose(back.model.language_model.rotary_emb.inv_freq, plain)
    # Built with it from the start, the same frequencies.
    built, _ = build_organism(OrganismConfig(text_layers=1, vision_depth=2, rope_slow_pairs=2))
    assert torch.allclose(built.model.language_model.rotary_emb.inv_freq, inv)
    with pytest.raises(ValueError, match="at least one pair"):
        slow_rotary(model, 6)


def test_phase_rope_slow_pairs_carry_to_later_phases():
    from pipeline.organism.recipe import Phase, recipe_from_dict, carried_at

    r = recipe_from_dict({"name": "r", "phases": [
        {"name": "a", "steps": 2, "lr": 1e-3}, {"name": "b", "steps": 2, "lr": 1e-3, "rope_slow_pairs": 2},
        {"name": "c", "steps": 2, "lr": 1e-3}, {"name": "d", "steps": 2, "lr": 1e-3, "rope_slow_pairs": 0}]})
    assert [carried_at(r, i, "rope_slow_pairs", 0) for i in range(4)] == [0, 2, 2, 0]
    assert carried_at(r, 0, "rope_slow_pairs", 3) == 3
    with pytest.raises(ValueError, match="rope_slow_pairs"):
        Phase("p", 1, 1e-3, rope_slow_pairs=-1)


def test_query_and_ask_probes_score_between_chance_bounds(tiny_adapter):
    from pipeline.organism.binding import ask_probe, query_probe

    q = query_probe(tiny_adapter, n=32)
    layers = [k for k in q if k.startswith("after_layer_")]
    n_layers = tiny_adapter.model.config.get_text_config().num_hidden_layers
    assert layers == [f"after_layer_{k}" for k in range(n_layers + 1)] and q["queries"] == 32
    assert all(0.0 <= q[k][a] <= 1.0 for k in layers for a in ("colour", "shape"))
    # Before any layer the position holds the same token for every query: nothing to read there.
    assert q["after_layer_0"]["colour"] <= 0.5 and q["after_layer_0"]["shape"] <= 0.5
    qi = query_probe(tiny_adapter, n=16, where="image")
    assert [k for k in qi if k.startswith("after_layer_")] == layers and qi["queries"] == 16
    with pytest.raises(ValueError, match="where"):
        query_probe(tiny_adapter, n=16, where="prompt")
    a = ask_probe(tiny_adapter, n=8)
    assert a["asked"] == 8 and all(0.0 <= a[k] <= 1.0 for k in ("colour", "shape", "both"))
    assert a["both"] <= min(a["colour"], a["shape"])
    from pipeline.organism.binding import detect_probe

    d = detect_probe(tiny_adapter, chats=4)
    # Every object of 4 calib scenes is labelled once: at least 2 per chat.
    assert d["labels"] >= 8 and 0.0 <= d["colour"] <= 1.0 and 0.0 <= d["shape"] <= 1.0


def test_detect_turns_list_every_object_once_per_chat(tiny_adapter):
    import json

    from pipeline.organism import Batcher
    from pipeline.organism.batcher import DETECT_PROMPT
    from pipeline.organism.scenes import make_scene

    ad = tiny_adapter
    plain = Batcher(ad, turns=3, seed=0).batch(0, 4)[1]
    # Unset, no random draw is spent on it: existing recipes make the same batches.
    assert Batcher(ad, turns=3, seed=0, detect_share=None).batch(0, 4)[1] == plain
    enc, conts, *_ = Batcher(ad, turns=3, seed=0, detect_share=1.0).batch(0, 4)
    tok = ad.tokenizer
    index, detected = 0, 0
    for segs, base, isz, osz in zip(conts, plain, enc.input_sizes, enc.orig_sizes):
        while not make_scene("shapes", "train", index).queries():
            index += 1
        scene = make_scene("shapes", "train", index)
        index += 1
        assert segs[0] == base[0]  # the first turn is the inference prompt's
        users = [tok.decode(segs[j][0]) for j in range(1, len(segs), 2)]
        assert sum(DETECT_PROMPT in u for u in users) == (1 if users else 0)
        if not users:
            continue
        assert DETECT_PROMPT in users[0]  # share 1.0: the first later turn, and only it
        items = json.loads(tok.decode(segs[2][0], skip_special_tokens=True))
        want = sorted(((tuple(int(round(v)) for v in ad.from_original((x, y, x + w, y + h), isz, osz)), o.category)
                       for o in scene.objects for x, y, w, h in [o.bbox]), key=lambda it: (it[0][0], it[0][1]))
        assert [(tuple(it["bbox_2d"]), it["label"]) for it in items] == want
        detected += 1
    assert detected >= 2


def test_answers_text_in_both_styles(tiny_adapter):
    import json

    ad = tiny_adapter
    items = [((1, 2, 3, 4), "red circle"), ((5.4, 6, 7, 8.6), "blue star")]
    plain = ad.answers_text(items)
    assert json.loads(plain) == [{"bbox_2d": [1, 2, 3, 4], "label": "red circle"},
                                 {"bbox_2d": [5, 6, 7, 9], "label": "blue star"}]
    assert ad.answer_text(*items[0]) == ad.answers_text(items[:1])
    style = ad.answer_style
    try:
        ad.answer_style = "fenced"
        fenced = ad.answers_text(items)
        assert fenced.startswith("```json\n[\n\t{") and fenced.endswith("}\n]\n```")
        assert json.loads(fenced[len("```json\n"):-len("\n```")]) == json.loads(plain)
    finally:
        ad.answer_style = style


def test_phase_detect_share_validated():
    from pipeline.organism.recipe import Phase

    assert Phase("p", 1, 1e-3, detect_share=0.5).detect_share == 0.5
    with pytest.raises(ValueError, match="detect_share"):
        Phase("p", 1, 1e-3, detect_share=2.0)


def test_text_first_prompt_puts_the_query_before_the_image(tiny_adapter, make_image):
    """`query_order` text_first: the query's words come before the image in the user turn (so the
    visual tokens can attend to them), the visual span is still found whole, and the sampler's
    greedy row (explicit positions after the prefill) is what `generate` decodes from that prompt."""
    import torch

    from pipeline.sampling import SamplingConfig, sample

    ad = tiny_adapter
    images = [make_image(112, 98, seed=3), make_image(168, 140, seed=4)]
    try:
        for order in ("image_first", "text_first"):
            ad.query_order = order
            text = ad._prompt_texts(["red circle"], False)[0][0]
            assert (text.index(ad.prompt("red circle")) < text.index(ad.processor.image_token)) == (order == "text_first")
            enc = ad.encode(images, ["red circle", "blue square"])
            ids = enc.inputs["input_ids"]
            for i, pos in enumerate(enc.visual_positions):
                assert (ids[i, pos] == ad.model.config.image_token_id).all()
                assert pos.numel() == enc.grids[i][0] * enc.grids[i][1]
                circle = ad.tokenizer(" circle" if i == 0 else " square", add_special_tokens=False)["input_ids"][-1]
                word_at = ids[i].tolist().index(circle)
                assert (word_at < int(pos[0])) == (order == "text_first")
            with torch.inference_mode():
                gen = sample(ad, enc, SamplingConfig(num_candidates=1, max_new_tokens=8, decode="full"), ["q0", "q1"])
                ref = ad.model.generate(**enc.inputs, do_sample=False, max_new_tokens=8)
            eos = ad.eos_token_ids[0]
            for q in range(2):
                row = ref[q, ids.shape[1]:].tolist()
                assert gen.tokens[q * gen.k] == (row[: row.index(eos)] if eos in row else row)
    finally:
        ad.query_order = "image_first"


def test_phase_query_order_and_turns_validated_and_carried():
    from pipeline.organism.recipe import Phase, carried_at, recipe_from_dict

    r = recipe_from_dict({"name": "r", "phases": [
        {"name": "a", "steps": 2, "lr": 1e-3}, {"name": "b", "steps": 2, "lr": 1e-3, "query_order": "text_first"},
        {"name": "c", "steps": 2, "lr": 1e-3, "turns": 1}]})
    assert [carried_at(r, i, "query_order", "image_first") for i in range(3)] == ["image_first", "text_first", "text_first"]
    with pytest.raises(ValueError, match="query_order"):
        Phase("p", 1, 1e-3, query_order="query_last")
    with pytest.raises(ValueError, match="turns"):
        Phase("p", 1, 1e-3, turns=0)


def test_target_probe_and_why_image_first_visual_tokens_cannot_know_the_target(tiny_adapter):
    import torch

    from pipeline.organism.batcher import cells_in_box
    from pipeline.organism.binding import target_probe

    ad = tiny_adapter
    layers = ad.num_layers
    res = target_probe(ad, n=16)
    assert res["queries"] >= 8 and 0 < res["uniform"] < 1
    assert len(res["target_attention_in_layer"]) == layers and len(res["knows_target_after_layer"]) == layers + 1
    assert all(0 <= v <= 1 for v in res["target_attention_in_layer"] + res["knows_target_after_layer"])
    # Cells: those whose centre is inside the box, else the one under its centre.
    assert cells_in_box((0, 0, 56, 28), (3, 4), (84, 112), (84, 112)) == [0, 1]
    assert cells_in_box((30, 30, 32, 32), (3, 4), (84, 112), (84, 112)) == [5]
    # Image first, the visual tokens' states do not depend on the query (attention is causal);
    # text first, they do: only then can a token know it is the object asked for.
    image = S.make_scene("shapes", "calib", 0).image
    try:
        for order, differ in (("image_first", False), ("text_first", True)):
            ad.query_order = order
            states = []
            for cat in ("red circle", "blue square"):
                enc = ad.encode([image], [cat])
                with torch.no_grad():
                    hid = ad.model(**enc.inputs, output_hidden_states=True).hidden_states[-1]
                states.append(hid[0, enc.visual_positions[0]])
            assert (not torch.allclose(*states, atol=1e-5)) == differ
    finally:
        ad.query_order = "image_first"


def test_target_cell_loss_reads_the_first_querys_cells(tiny_adapter):
    """Weighted by three groups of cells (target, other objects, background); the batch says which
    box each chat's first query names and where the scene's other objects are."""
    import math

    import torch

    from pipeline.organism import Batcher
    from pipeline.organism.batcher import target_cell_loss, training_inputs

    ad = tiny_adapter
    try:
        ad.query_order = "text_first"
        enc, conts, _, targets, _ = Batcher(ad, turns=1, seed=0).batch(0, 3)
        for (box, others), segs in zip(targets, conts):
            assert f"[{', '.join(str(int(round(v))) for v in box)}]" in ad.tokenizer.decode(segs[0][0])
            assert box not in others
        assert sum(len(o) for _, o in targets) >= 1
        inputs, _ = training_inputs(enc, conts, ad.pad_token_id)
        ad.model.zero_grad(set_to_none=True)
        hidden = ad.model(**inputs, output_hidden_states=True).hidden_states
        ids = [ad.tokenizer(d, add_special_tokens=False)["input_ids"][-1] for d in ("0", "1")]
        loss = target_cell_loss(ad.model, hidden, enc, targets, ids)
        assert loss.item() > 0 and math.isfinite(loss.item())
        loss.backward()
        first = ad.model.model.language_model.layers[0].self_attn.q_proj.weight.grad
        assert first is not None and first.abs().sum() > 0
        # The same token for "in" and "out": every logit is 0, so the loss is exactly ln 2.
        same = target_cell_loss(ad.model, [h.detach() for h in hidden], enc, targets, [ids[0], ids[0]])
        assert same.item() == pytest.approx(math.log(2), abs=1e-6)
    finally:
        ad.query_order = "image_first"
        ad.model.zero_grad(set_to_none=True)


def test_object_word_loss_names_each_objects_words_at_the_towers_tokens(tiny_adapter):
    """Every object's cells name its colour and shape; at hidden state 0 the gradient reaches the
    tower. With one token for every word each logit ties, so the loss is exactly (ln 8 + ln 6) / 2."""
    import math

    import torch

    from pipeline.organism import Batcher
    from pipeline.organism.batcher import object_word_loss, training_inputs, word_ids
    from pipeline.organism.scenes import COLOURS, SHAPES

    ad = tiny_adapter
    try:
        batch = Batcher(ad, turns=1, seed=0).batch(0, 3)
        assert [len(o) for o in batch.objects] == [len(others) + 1 for _, others in batch.targets]
        assert all(any(b == box for _, b in objs) for (box, _), objs in zip(batch.targets, batch.objects))
        inputs, _ = training_inputs(batch.enc, batch.conts, ad.pad_token_id)
        ad.model.zero_grad(set_to_none=True)
        hidden = ad.model(**inputs, output_hidden_states=True).hidden_states
        colours, shapes = word_ids(ad.tokenizer, COLOURS), word_ids(ad.tokenizer, SHAPES)
        assert len(set(colours + shapes)) == len(COLOURS) + len(SHAPES)
        loss = object_word_loss(ad.model, hidden, batch.enc, batch.objects, colours, shapes, layer=0)
        assert loss.item() > 0 and math.isfinite(loss.item())
        loss.backward()
        tower = ad.model.model.visual.patch_embed.proj.weight.grad
        assert tower is not None and tower.abs().sum() > 0
        one = [colours[0]]
        tied = object_word_loss(ad.model, [h.detach() for h in hidden], batch.enc, batch.objects,
                                one * len(COLOURS), one * len(SHAPES), layer=2)
        assert tied.item() == pytest.approx((math.log(len(COLOURS)) + math.log(len(SHAPES))) / 2, abs=1e-5)
        with pytest.raises(ValueError, match="hidden states 0 to"):
            object_word_loss(ad.model, hidden, batch.enc, batch.objects, colours, shapes, layer=len(hidden))
        with pytest.raises(ValueError, match="one token"):
            word_ids(ad.tokenizer, ["circle", "notawordinthisvocabulary"])
    finally:
        ad.model.zero_grad(set_to_none=True)


def test_wrong_object_probe_splits_wrong_answers_by_the_shared_word(tiny_adapter):
    from pipeline.organism.binding import run_all, wrong_object_probe

    w = wrong_object_probe(tiny_adapter, n=16)
    assert w["queries"] == 16 and 0 <= w["other_object"] <= 16
    assert w["same_colour"] + w["same_shape"] + w["neither"] == w["other_object"]
    assert 0 <= w["larger"] <= w["other_object"]
    # A probe name that does not exist fails before any checkpoint is read.
    with pytest.raises(ValueError, match="unknown probes"):
        run_all("no/such/checkpoint", only=["wrong_objects", "nope"])
