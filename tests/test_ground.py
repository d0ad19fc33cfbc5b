"""The per-query core (`Grounder.ground`) and the `acs ground` CLI."""

import json
import math

import numpy as np
import pytest

from pipeline.boxes import RawBox, clamp_box
from pipeline.ground import GroundConfig, Grounder, Query
from pipeline.metrics import box_iou
from pipeline.sampling import SamplingConfig

SCORE_KEYS = {"greedy", "random", "logprob", "vote", "acs-free", "loc-mass", "oracle"}
CFG = GroundConfig(sampling=SamplingConfig(num_candidates=4, max_new_tokens=32))


def expected_box(adapter, image, model_box):
    """Where the adapter puts `model_box` (resized-input pixels) in `image`'s pixels."""
    enc = adapter.encode([image], ["x"])
    raw = RawBox(tuple(map(float, model_box)), ((0, 0),) * 4)
    box, _ = clamp_box(adapter.to_original(raw, enc.input_sizes[0], enc.orig_sizes[0]), image.width, image.height)
    return box


@pytest.fixture(scope="module")
def queries(parrot_adapter, parrot_box, make_image):
    img0, img1 = make_image(100, 90, seed=21), make_image(150, 120, seed=22)
    gt0 = expected_box(parrot_adapter, img0, parrot_box)
    return [Query("q0", img0, "red circle", gt=gt0), Query("q1", img1, "blue square", gt=(60, 50, 140, 110))]


@pytest.fixture(scope="module")
def results(parrot_adapter, queries):
    return Grounder(parrot_adapter, CFG).ground(queries)


def test_ground_candidates(parrot_adapter, queries, results):
    assert [r.query_id for r in results] == ["q0", "q1"]
    nl, nh = parrot_adapter.num_layers, parrot_adapter.num_heads
    enc = parrot_adapter.encode([q.image for q in queries], [q.category for q in queries])
    for res, q, grid in zip(results, queries, enc.grids):
        assert res.status == "ok" and res.error is None
        assert res.grid_hw == grid
        assert res.layers == list(range(nl)) and res.heads == list(range(nh))
        assert [c.cand_idx for c in res.candidates] == [0, 1, 2, 3, 4]
        log_v = math.log(grid[0] * grid[1])
        for c in res.candidates:
            assert c.status in {"ok", "no_box"}
            assert (c.status == "ok") == (c.box is not None) == (c.error is None)
            assert set(c.scores) >= SCORE_KEYS, c.scores.keys()
            assert 0 < c.n_tokens <= 32
            if c.box is None:
                assert c.entropy is None
                assert all(math.isnan(c.scores[k]) for k in SCORE_KEYS)
                continue
            x1, y1, x2, y2 = c.box
            assert 0 <= x1 < x2 <= q.image.width and 0 <= y1 < y2 <= q.image.height
            assert c.entropy.shape == (4, nl, nh)
            assert np.isfinite(c.entropy).all()
            assert c.entropy.min() >= 0 and c.entropy.max() <= log_v + 1e-5
            assert math.isfinite(c.mean_logprob) and c.mean_logprob <= 0
            assert all(math.isfinite(c.scores[k]) for k in SCORE_KEYS)
            assert c.scores["acs-free"] <= 0
            assert 0 <= c.scores["loc-mass"] <= 1 + 1e-6
            assert c.iou == pytest.approx(box_iou([c.box], [q.gt])[0, 0])
            assert c.scores["oracle"] == pytest.approx(c.iou)


def test_ground_greedy_is_parrot_box(results, queries):
    for res, q in zip(results, queries):
        c0 = res.candidates[0]
        assert c0.box is not None and '"bbox_2d": [10, 20, 50, 60]' in c0.text
        assert res.selected["greedy"] == 0
    assert results[0].candidates[0].box == pytest.approx(queries[0].gt)
    assert results[0].candidates[0].iou == pytest.approx(1.0)


def test_ground_selections(results):
    for res in results:
        ok = [c for c in res.candidates if c.box is not None]
        assert set(res.selected) >= SCORE_KEYS
        for name in SCORE_KEYS:
            chosen = res.selected[name]
            assert chosen is not None and res.candidates[chosen].box is not None, name
            assert res.candidates[chosen].scores[name] == max(c.scores[name] for c in ok), name
        best_iou = max(c.iou for c in ok)
        assert res.candidates[res.selected["oracle"]].iou == best_iou


def test_ground_independent_of_batch(parrot_adapter, queries, results):
    alone = Grounder(parrot_adapter, CFG).ground([queries[1]])[0]
    together = results[1]
    assert [c.text for c in alone.candidates] == [c.text for c in together.candidates]
    for a, b in zip(alone.candidates, together.candidates):
        if a.entropy is not None:
            np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-4)
    assert alone.selected["random"] == together.selected["random"]


def test_ground_capture_modes(parrot_adapter, queries):
    q = [queries[0]]
    prof = Grounder(parrot_adapter, GroundConfig(sampling=CFG.sampling, capture="profile")).ground(q)[0]
    layers = sorted({l for l, _ in Grounder(parrot_adapter, CFG).profile.heads})
    assert prof.layers == layers == [1]
    c0 = prof.candidates[0]
    assert c0.entropy.shape == (4, 1, parrot_adapter.num_heads)
    assert "acs-free" in c0.scores and "loc-mass" not in c0.scores

    none = Grounder(parrot_adapter, GroundConfig(sampling=CFG.sampling, capture="none")).ground(q)[0]
    assert none.layers == [] and all(c.entropy is None for c in none.candidates)
    assert "acs-free" not in none.selected and none.selected["greedy"] == 0

    with pytest.raises(ValueError, match="capture must be one of"):
        Grounder(parrot_adapter, GroundConfig(capture="some"))


def test_ground_special_token_text_in_query(parrot_adapter, queries):
    bad = Query("bad", queries[1].image, "red <|image_pad|> circle")
    results = Grounder(parrot_adapter, CFG).ground([queries[0], bad])
    assert [r.query_id for r in results] == ["q0", "bad"]
    assert results[0].status == "ok"
    assert results[1].status == "query_error" and "<|image_pad|>" in results[1].error


def test_ground_adaptive_k(parrot_adapter, queries, results):
    """Agreeing first-round candidates stop sampling; rows stay N+1 with status `skipped`."""
    cfg = GroundConfig(sampling=CFG.sampling, adaptive=True, adaptive_first=2, adaptive_iou=0.5)
    adaptive = Grounder(parrot_adapter, cfg).ground(queries)
    for full, res in zip(results, adaptive):
        assert [c.cand_idx for c in res.candidates] == list(range(CFG.sampling.num_candidates + 1))
        first = res.candidates[:3]
        agreed = all(c.box is not None for c in first) and res.candidates[3].status == "skipped"
        if agreed:
            assert all(c.status == "skipped" and c.box is None for c in res.candidates[3:])
            assert res.timings["generated_tokens"] < full.timings["generated_tokens"]
        assert res.candidates[0].box == full.candidates[0].box  # greedy does not depend on K
    assert any(r.candidates[-1].status == "skipped" for r in adaptive), "the parrot's boxes should agree"


def test_ground_empty_batch(parrot_adapter):
    assert Grounder(parrot_adapter, CFG).ground([]) == []


def test_ground_random_model_no_box(tiny_adapter, make_image):
    qs = [Query("r0", make_image(84, 84, seed=1), "red circle", gt=(0, 0, 10, 10)),
          Query("r1", make_image(112, 140, seed=2), "cat")]
    results = Grounder(tiny_adapter, GroundConfig(sampling=SamplingConfig(num_candidates=4, max_new_tokens=16))
                       ).ground(qs)
    for res in results:
        assert res.status == "no_box"
        assert "none of the 5 candidates contained a box" in res.error
        assert len(res.candidates) == 5
        assert all(c.status == "no_box" and c.box is None and c.error for c in res.candidates)
        assert all(v is None for v in res.selected.values())
    assert "oracle" in results[0].selected and "oracle" not in results[1].selected


# ------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def image_path(tmp_path_factory, make_image):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    make_image(100, 90, seed=21).save(path)
    return path


def test_cli_json(image_path, parrot_model_dir, parrot_adapter, parrot_box, capsys):
    from jobs.ground import main

    rc = main([str(image_path), "--query", "red circle", "--model", str(parrot_model_dir),
               "--num-candidates", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["status"] == "ok" and out["query"] == "red circle" and out["selector"] == "acs-free"
    assert [c["cand_idx"] for c in out["candidates"]] == [0, 1, 2, 3]
    from PIL import Image

    want = expected_box(parrot_adapter, Image.open(image_path).convert("RGB"), parrot_box)
    assert out["candidates"][0]["box"] == pytest.approx(list(want))
    assert out["selected_by"]["greedy"] == 0
    assert out["selected"] == out["selected_by"]["acs-free"] is not None
    assert set(out["candidates"][0]["scores"]) >= SCORE_KEYS - {"oracle"}


def test_cli_table(image_path, parrot_model_dir, capsys):
    from jobs.ground import main

    rc = main([str(image_path), "--query", "red circle", "--model", str(parrot_model_dir),
               "--num-candidates", "1", "--selector", "greedy"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "status=ok" in out and "selected by greedy: candidate 0:" in out
    assert out.count("\n") == 5  # header, column names, 2 candidates, selection


def _exit_code(argv):
    from jobs.ground import main

    try:
        return main(argv)
    except SystemExit as e:  # argparse errors
        return e.code


def test_cli_negative_num_candidates(image_path, parrot_model_dir, capsys):
    argv = [str(image_path), "--query", "red circle", "--model", str(parrot_model_dir), "--num-candidates", "-1"]
    assert _exit_code(argv) == 2


def test_cli_missing_model(image_path, tmp_path, capsys):
    missing = tmp_path / "no-model"
    assert _exit_code([str(image_path), "--query", "red circle", "--model", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize("query", ["", "   "])
def test_cli_empty_query(image_path, query, capsys):
    from jobs.ground import main

    assert main([str(image_path), "--query", query, "--model", "/nonexistent"]) == 2
    assert "--query is empty" in capsys.readouterr().err


def test_cli_missing_image(tmp_path, capsys):
    from jobs.ground import main

    missing = tmp_path / "nope.png"
    assert main([str(missing), "--query", "red circle", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "not found" in err


def test_cli_zero_byte_image(tmp_path, capsys):
    from jobs.ground import main

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert main([str(empty), "--query", "red circle", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "empty" in err


# ------------------------------------------------------------------------------------ every family


def test_ground_every_family_random_model(family_adapter, make_image):
    """One query end to end on each family's tiny random model: a status, never an exception."""
    qs = [Query("f0", make_image(240, 112, seed=5), "red circle", gt=(10, 10, 60, 50))]
    res = Grounder(family_adapter, GroundConfig(sampling=SamplingConfig(num_candidates=2, max_new_tokens=12))
                   ).ground(qs)[0]
    assert res.status in {"ok", "no_box"} and len(res.candidates) == 3
    assert all(c.status in {"ok", "no_box"} for c in res.candidates)
    assert res.grid_hw == family_adapter.encode([qs[0].image], ["x"]).grids[0]


def test_ground_every_family_with_a_box(family_adapter, make_image, monkeypatch):
    """The candidates' tokens replaced by the family's own answer for a known box (teacher forcing:
    capture only keeps the prompt's cache), so parsing, capture and every score run on each family."""
    import pipeline.ground as ground_mod

    ad = family_adapter
    image, gt = make_image(240, 112, seed=6), (30.0, 20.0, 150.0, 90.0)
    enc = ad.encode([image], ["red circle"])
    answer = ad.answer_text(ad.from_original(gt, enc.input_sizes[0], enc.orig_sizes[0]), "red circle")
    forced = ad.tokenizer(answer, add_special_tokens=False)["input_ids"]
    real_sample = ground_mod.sample

    def forced_sample(*args, **kwargs):
        gen = real_sample(*args, **kwargs)
        for r in range(len(gen.tokens)):
            if r % 2 == 0:  # every other candidate answers the box; the rest keep their random text
                gen.tokens[r], gen.logprobs[r] = list(forced), [-0.5] * len(forced)
        return gen

    monkeypatch.setattr(ground_mod, "sample", forced_sample)
    res = Grounder(ad, GroundConfig(sampling=SamplingConfig(num_candidates=3, max_new_tokens=8))).ground(
        [Query("f1", image, "red circle", gt=gt)])[0]
    assert res.status == "ok"
    nl, nh = ad.num_layers, ad.num_heads
    gh, gw = res.grid_hw
    for c in res.candidates[::2]:
        assert c.status == "ok" and c.box == pytest.approx(gt, abs=0.5 * max(image.width, image.height) / 1000 + 0.6)
        assert c.entropy.shape == (4, nl, nh) and np.isfinite(c.entropy).all()
        assert c.entropy.max() <= math.log(gh * gw) + 1e-5
        assert 0 <= c.scores["loc-mass"] <= 1 + 1e-6 and math.isfinite(c.scores["acs-free"])
        assert c.iou == pytest.approx(1.0, abs=0.05)
    assert res.selected["acs-free"] is not None and res.selected["oracle"] is not None


def test_cli_every_family(family_dir, image_path, capsys):
    from jobs.ground import main

    rc = main([str(image_path), "--query", "red circle", "--model", str(family_dir), "--num-candidates", "2",
               "--max-new-tokens", "12", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["status"] in {"ok", "no_box"} and len(out["candidates"]) == 3
