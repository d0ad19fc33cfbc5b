"""The organism's training batches: multi-turn conversations whose labels are exactly the answers."""

from pipeline.organism import Batcher, training_inputs


def test_multi_turn_labels_are_the_answers_and_first_turn_is_the_inference_prompt(tiny_adapter):
    ad = tiny_adapter
    b = Batcher(ad, turns=3, seed=0)
    enc, conts, nxt = b.batch(0, 2)
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
    enc, conts, _ = Batcher(ad, turns=1, seed=1).batch(0, 2)
    plain = [[t for seg, _ in c for t in seg] for c in conts]
    a, la = training_inputs(enc, conts, ad.pad_token_id)
    b, lb = training_inputs(enc, plain, ad.pad_token_id)
    assert (la == lb).all() and (a["input_ids"] == b["input_ids"]).all()


def test_image_dependence_swaps_images_and_restores_them(tiny_adapter):
    import math

    import torch

    from jobs.train_organism import image_dependence

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

    from jobs.train_organism import image_dependence

    res = image_dependence(tiny_adapter, n=2, max_objects=1)
    per = res["gap_per_coordinate"]
    assert list(per) == ["x1", "y1", "x2", "y2"]
    # The mean gap is the mean of the four coordinates' gaps: the "2" of "bbox_2d" is not one.
    assert sum(per.values()) / 4 == pytest.approx(res["gap"], abs=1e-3)


def test_train_organism_runs_resumes_and_keeps_a_frozen_tower(tmp_path, capsys):
    """Two steps of the real training job on curriculum scenes, then a resume to step 3: checkpoint,
    log, the --visual-norm rescale and --freeze-vision-steps all do what they say."""
    import json

    import torch
    from safetensors.torch import load_file

    from jobs.train_organism import main

    out = tmp_path / "run"
    args = ["--out", str(out), "--batch-size", "2", "--input", "64x48", "--max-objects", "1",
            "--turns", "2", "--warmup", "1", "--eval-every", "1000", "--eval-n", "2", "--ckpt-every", "1",
            "--visual-norm", "1.0", "--freeze-vision-steps", "2", "--threads", "2"]
    assert main(args + ["--steps", "1"]) == 0
    after1 = load_file(str(out / "ckpt" / "model.safetensors"))
    assert "visual tokens rescaled by" in capsys.readouterr().out
    assert main(args + ["--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "resuming at step 1" in printed and "rescaled" not in printed  # rescale only at the start
    after2 = load_file(str(out / "ckpt" / "model.safetensors"))
    state = json.loads((out / "ckpt" / "state.json").read_text())
    assert state["step"] == 2 and state["next_index"] >= 4
    vis = [k for k in after1 if k.startswith("visual.")]
    text = [k for k in after1 if k.startswith("model.layers.")]
    assert vis and text
    assert all(torch.equal(after1[k], after2[k]) for k in vis)  # frozen for both steps
    assert any(not torch.equal(after1[k], after2[k]) for k in text)
    # The final step evaluates: the log has the greedy table and the curriculum's image dependence.
    ev = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert ev and ev[-1]["step"] == 2 and "image_dependence_curriculum" in ev[-1]
    assert ev[-1]["curriculum_greedy"]["all"]["n"] == 2 and ev[-1]["all"]["n"] == 2
