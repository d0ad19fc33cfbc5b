"""Box-only decoding (pipeline/sampling.py, `decode="box"`): the answer's opening is forced once per
query, rows stop when their box closes and leave the decode batch; against full decoding."""

import pytest
import torch

from pipeline.ground import GroundConfig, Grounder, Query
from pipeline.sampling import SamplingConfig, sample

SIZES = [(112, 84), (140, 112), (98, 98)]
CATS = ["red circle", "blue square", "green triangle"]


def _cfg(decode, n=6, t=1.0):
    return SamplingConfig(num_candidates=n, max_new_tokens=40, temperature=t, decode=decode)


def test_opening_is_the_answer_up_to_its_first_coordinate(family, family_adapter, make_image):
    ad = family_adapter
    openings = {"qwen2.5-vl": '[{"bbox_2d": [', "qwen3-vl": '```json\n[\n\t{"bbox_2d": [',
                "internvl3.5": "<ref>red circle</ref><box>[["}
    assert ad.answer_opening("red circle") == openings[family]
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    plain = ad.encode(images, CATS)
    forced = ad.encode(images, CATS, opening=True)
    assert plain.openings is None
    for i, c in enumerate(CATS):
        want = ad.tokenizer(ad.answer_opening(c), add_special_tokens=False)["input_ids"]
        assert forced.openings[i] == want and forced.opening_texts[i] == ad.answer_opening(c)
        ids = forced.inputs["input_ids"][i]
        assert ids[-len(want):].tolist() == want
        # the same prompt before it, the same visual tokens
        real = ids[forced.inputs["attention_mask"][i] == 1][:-len(want)]
        assert real.tolist() == plain.inputs["input_ids"][i][plain.inputs["attention_mask"][i] == 1].tolist()
        assert forced.visual_positions[i].numel() == plain.visual_positions[i].numel()
        assert (ids[forced.visual_positions[i]] == ad.model.config.image_token_id).all()
        # the opening is also how the answer's own tokens start (as the model was trained to write it)
        answer = ad.tokenizer(ad.answer_text((10, 20, 30, 40), c), add_special_tokens=False)["input_ids"]
        assert answer[:len(want)] == want
    assert all("]" in ad.tokenizer.convert_ids_to_tokens(i) for i in ad.box_close_ids)
    assert ad.tokenizer.convert_tokens_to_ids("]") in ad.box_close_ids


@pytest.fixture(scope="module")
def parrot_pair(parrot_adapter, make_image):
    """Full and box-only generations of the same queries (the parrot always answers one box)."""
    ad = parrot_adapter
    images = [make_image(w, h, seed=30 + i) for i, (w, h) in enumerate(SIZES)]
    keys = [f"q{i}" for i in range(len(SIZES))]
    full_enc = ad.encode(images, CATS)
    box_enc = ad.encode(images, CATS, opening=True)
    return full_enc, sample(ad, full_enc, _cfg("full"), keys), box_enc, sample(ad, box_enc, _cfg("box"), keys)


def test_greedy_box_is_the_full_decodings(parrot_adapter, parrot_pair, parrot_box):
    ad = parrot_adapter
    full_enc, full, box_enc, box = parrot_pair
    for q in range(len(SIZES)):
        r = q * full.k
        opening = box_enc.openings[q]
        assert full.tokens[r][:len(opening)] == opening  # the parrot writes this opening itself
        n = len(box.tokens[r])
        assert box.tokens[r] == full.tokens[r][len(opening):len(opening) + n]
        # it ends on the token closing the box (`],` for this tokenizer)
        assert box.tokens[r][-1] in ad.box_close_ids and "]" in ad.tokenizer.decode(box.tokens[r][-1:])
        ft, fp = ad.parse(full.tokens[r], full_enc.input_sizes[q], full_enc.orig_sizes[q])
        bt, bp = ad.parse(box.tokens[r], box_enc.input_sizes[q], box_enc.orig_sizes[q], box_enc.opening_texts[q])
        assert bp.box == fp.box is not None and ft.startswith(bt)
        # coordinate tokens index the generated tokens, shifted by the forced opening
        assert [[i + len(opening) for i in s] for s in bp.coord_tokens] == fp.coord_tokens
        assert box.logprobs[r] == pytest.approx(full.logprobs[r][len(opening):len(opening) + n], abs=1e-4)
    # at most half the decode steps per candidate (the label and closing brackets are not decoded)
    assert box.n_generated * 2 <= full.n_generated
    assert sum(box.decoded) == box.n_generated and sum(full.decoded) == full.n_generated


def test_sampled_boxes_are_the_full_decodings_where_the_opening_matches(parrot_adapter, parrot_pair):
    full_enc, full, box_enc, box = parrot_pair
    matched = 0
    for r, (f, b) in enumerate(zip(full.tokens, box.tokens)):
        opening = box_enc.openings[r // full.k]
        if f[:len(opening)] != opening:
            continue  # this row would have written another opening: its draws diverge from there
        matched += 1
        assert b == f[len(opening):len(opening) + len(b)], f"row {r}"
    # every query has sampled rows that matched, including rows after others left the batch
    assert matched > len(SIZES) * 3
    assert len({len(t) for t in box.tokens}) > 1 or len({len(t) for t in full.tokens}) > 1


def test_rows_leaving_the_batch_change_nothing(parrot_adapter, make_image):
    """A query's samples do not depend on the others it is batched with, though its rows now leave
    the decode batch at other steps."""
    ad = parrot_adapter
    images = [make_image(w, h, seed=40 + i) for i, (w, h) in enumerate(SIZES)]
    together = sample(ad, ad.encode(images, CATS, opening=True), _cfg("box", t=1.5), ["a", "b", "c"])
    alone = sample(ad, ad.encode(images[1:2], CATS[1:2], opening=True), _cfg("box", t=1.5), ["b"])
    k = together.k
    assert together.tokens[k:2 * k] == alone.tokens


def test_capture_is_the_same_in_both_modes(parrot_adapter, make_image, parrot_box):
    """The coordinate rows' attention (METHOD.md) does not depend on whether the opening was
    sampled or forced."""
    ad = parrot_adapter
    q = [Query("q0", make_image(112, 84, seed=3), "red circle")]
    res = {d: Grounder(ad, GroundConfig(sampling=_cfg(d, n=2))).ground(q)[0] for d in ("full", "box")}
    f, b = res["full"].candidates[0], res["box"].candidates[0]
    assert f.box == b.box is not None
    assert b.text.startswith(ad.answer_opening("red circle")) and f.text.startswith(b.text)
    assert b.n_tokens < f.n_tokens
    torch.testing.assert_close(torch.tensor(b.entropy), torch.tensor(f.entropy), atol=1e-4, rtol=0)
    assert res["box"].timings["generated_tokens"] < res["full"].timings["generated_tokens"]


def test_every_family_decodes_box_only(family_adapter, make_image):
    """Random weights: rows end at EOS, at a token closing a box, or at the length limit; a closing
    token only ever ends a row."""
    ad = family_adapter
    images = [make_image(w, h, seed=50 + i) for i, (w, h) in enumerate(SIZES)]
    enc = ad.encode(images, CATS, opening=True)
    gen = sample(ad, enc, SamplingConfig(num_candidates=3, max_new_tokens=12, temperature=2.0), ["a", "b", "c"])
    close = set(ad.box_close_ids)
    for r, toks in enumerate(gen.tokens):
        assert not close & set(toks[:-1])
        assert len(toks) <= gen.decoded[r] <= 12
        ad.parse(toks, enc.input_sizes[r // gen.k], enc.orig_sizes[r // gen.k], enc.opening_texts[r // gen.k])


def test_decode_mode_is_validated():
    with pytest.raises(ValueError, match="decode"):
        SamplingConfig(decode="boxes")
