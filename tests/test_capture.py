"""Sampling and attention capture against eager attention and `generate` (pipeline/sampling.py,
pipeline/capture.py)."""

import math

import pytest
import torch

from pipeline.capture import entropy, pad_positions
from pipeline.sampling import SamplingConfig, capture_rows, sample

CFG = SamplingConfig(num_candidates=3, max_new_tokens=8)
N_WANTED = 4  # first generated tokens captured per row
# Two images with different visual-token counts in every family (the first query is left padded):
# Qwen2.5-VL 12 and 36 tokens, Qwen3-VL 12 and 32, InternVL 1 tile (16) and 2 tiles + thumbnail (48).
SIZES = [(112, 84), (240, 112)]
CATS = ["red circle", "blue square"]

# Capture exactness is checked for every family: the capture pass must see exactly the language
# model's decoder attention (per layer index), whatever the family's positions and vision tower.


@pytest.fixture(scope="module")
def eager_model(family_dir):
    from pipeline.models.base import load_adapter

    return load_adapter(str(family_dir), device="cpu", attn_implementation="eager").model


@pytest.fixture(scope="module")
def images(make_image):
    return [make_image(w, h, seed=10 + i) for i, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def batch(family_adapter, images):
    enc = family_adapter.encode(images, CATS)
    assert (enc.inputs["attention_mask"][0] == 0).any()  # padding is exercised
    return enc


def _wanted(gen):
    return [list(range(min(N_WANTED, len(t)))) for t in gen.tokens]


@torch.inference_mode()
def _eager_reference(adapter, eager_model, images, batch, gen, wanted, raw=False):
    """Per row: eager attention from the steps of its `wanted` tokens onto its visual tokens,
    renormalised over them, (R, L, H, V); each row gets its own full forward, of its query alone
    (encoded unpadded) followed by the row's generated tokens. `raw`: not renormalised."""
    refs = []
    for r, toks in enumerate(gen.tokens):
        if not wanted[r]:
            refs.append(None)
            continue
        q = r // gen.k
        one = adapter.encode([images[q]], [CATS[q]])
        inputs = dict(one.inputs)
        p = inputs["input_ids"].shape[1]
        gen_ids = torch.tensor(toks, dtype=torch.long)[None]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], gen_ids], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(gen_ids)], 1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(gen_ids)], 1)
        out = eager_model(**inputs, output_attentions=True)
        assert len(out.attentions) == adapter.num_layers  # the decoder's layers, not the vision tower's
        vis = one.visual_positions[0]
        assert vis.numel() == batch.visual_positions[q].numel()
        rows = torch.tensor([p - 1 + j for j in wanted[r]])
        att = torch.stack([a[0][:, rows][:, :, vis] for a in out.attentions], 1)  # (H, L, R, V)
        if not raw:
            att = att / att.sum(-1, keepdim=True)
        refs.append(att.permute(2, 1, 0, 3).float())  # (R, L, H, V)
    return refs


@pytest.fixture(scope="module")
def full_capture(family_adapter, eager_model, batch, images):
    gen = sample(family_adapter, batch, CFG, ["qa", "qb"])
    wanted = _wanted(gen)
    refs = _eager_reference(family_adapter, eager_model, images, batch, gen, wanted)
    maps = capture_rows(family_adapter, batch, gen, wanted, list(range(family_adapter.num_layers)))
    return gen, wanted, refs, maps


def test_capture_matches_eager_attention(family_adapter, batch, full_capture):
    gen, wanted, refs, maps = full_capture
    nl, nh = family_adapter.num_layers, family_adapter.num_heads
    assert len(maps) == 2 * CFG.num_candidates + 2
    checked = 0
    for r, (m, ref) in enumerate(zip(maps, refs)):
        if ref is None:
            assert m is None
            continue
        v = batch.visual_positions[r // gen.k].numel()
        assert m.shape == (len(wanted[r]), nl, nh, v) and m.dtype == torch.float32
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), rtol=0, atol=1e-5)
        assert (m - ref).abs().max().item() <= 1e-5, f"row {r}"
        checked += len(wanted[r])
    assert checked >= 2 * N_WANTED  # at least the two greedy rows were compared in full
    # the maps are not uniform, so the comparison is informative
    assert max((m - 1 / m.shape[-1]).abs().max().item() for m in maps if m is not None) > 1e-3



def test_capture_matches_eager_attention_query_first(family_adapter, eager_model, images):
    """A checkpoint trained with the query before the image (`query_order` text_first, recorded in
    its acs_model.json) is captured as exactly: the visual span moves, the maps do not change kind."""
    ad = family_adapter
    try:
        ad.query_order = "text_first"
        enc = ad.encode(images, CATS)
        gen = sample(ad, enc, CFG, ["qa", "qb"])
        wanted = _wanted(gen)
        refs = _eager_reference(ad, eager_model, images, enc, gen, wanted)
        maps = capture_rows(ad, enc, gen, wanted, list(range(ad.num_layers)))
    finally:
        ad.query_order = "image_first"
    compared = [(m - ref).abs().max().item() for m, ref in zip(maps, refs) if ref is not None]
    assert len(compared) >= 2 and max(compared) <= 1e-5

def test_capture_visual_mass_matches_eager(family_adapter, eager_model, batch, images):
    """mass_rows: the share of those rows' attention on the image before renormalising, which the
    localization-heads baseline ranks heads by; row 0 is the prompt's last token."""
    gen = sample(family_adapter, batch, CFG, ["qa", "qb"])
    wanted = [[0, 1] if r % gen.k == 0 and len(t) > 1 else [] for r, t in enumerate(gen.tokens)]
    assert sum(map(bool, wanted)) == 2
    raw = _eager_reference(family_adapter, eager_model, images, batch, gen, wanted, raw=True)
    greedy_rows = [r for r in range(len(wanted)) if wanted[r]]
    maps, masses = capture_rows(family_adapter, batch, gen, wanted, list(range(family_adapter.num_layers)),
                                mass_rows=greedy_rows + [1])  # row 1 wants nothing: no mass for it
    for r, ref in enumerate(raw):
        if ref is None:
            assert masses[r] is None and maps[r] is None
            continue
        share = ref.sum(-1)  # (R, L, H)
        assert masses[r].shape == share.shape
        assert (masses[r] - share).abs().max().item() <= 1e-5, f"row {r}"
        assert (maps[r] - ref / share[..., None]).abs().max().item() <= 1e-5
        assert 0 < share.min().item() and share.max().item() < 1 and share.std().item() > 1e-3


def test_capture_only_decoder_attention(family_adapter, batch):
    """`install` routes the language model's attention through the capture function and nothing
    else: every module that reaches it is a decoder self-attention with its own layer index."""
    from pipeline import capture

    model = family_adapter.model
    gen = sample(family_adapter, batch, CFG, ["qa", "qb"])
    seen = []
    orig = capture._rows_over_visual

    def spy(req, query, key, scaling):
        seen.append(query.shape[1])
        return orig(req, query, key, scaling)

    capture._rows_over_visual = spy
    try:
        capture_rows(family_adapter, batch, gen, _wanted(gen), list(range(family_adapter.num_layers)))
    finally:
        capture._rows_over_visual = orig
    assert seen == [family_adapter.num_heads] * family_adapter.num_layers
    text_cfg = model.config.get_text_config()
    assert text_cfg._attn_implementation == capture.ATTN_NAME
    assert model.config.vision_config._attn_implementation != capture.ATTN_NAME
    idx = sorted(m.layer_idx for m in model.modules()
                 if getattr(m, "config", None) is text_cfg and hasattr(m, "layer_idx")
                 and type(m).__name__.endswith("Attention"))
    assert idx == list(range(family_adapter.num_layers))


def test_capture_head_subset(family_adapter, batch, full_capture):
    gen0, _, refs, _ = full_capture
    gen = sample(family_adapter, batch, CFG, ["qa", "qb"])
    assert gen.tokens == gen0.tokens
    wanted = _wanted(gen)
    maps = capture_rows(family_adapter, batch, gen, wanted, list(range(family_adapter.num_layers)),
                        heads=torch.tensor([1, 3]))
    for m, ref in zip(maps, refs):
        if ref is not None:
            assert m.shape[2] == 2
            assert (m - ref[:, :, [1, 3]]).abs().max().item() <= 1e-5


def test_capture_single_layer(family_adapter, batch, full_capture):
    gen0, _, refs, _ = full_capture
    gen = sample(family_adapter, batch, CFG, ["qa", "qb"])
    wanted = _wanted(gen)
    maps = capture_rows(family_adapter, batch, gen, wanted, [2])
    for m, ref in zip(maps, refs):
        if ref is not None:
            assert m.shape[1] == 1
            assert (m - ref[:, [2]]).abs().max().item() <= 1e-5


def test_capture_sparse_wanted_rows(family_adapter, batch, full_capture):
    """Non-contiguous wanted indices, and rows that want nothing, come back as asked."""
    gen0, wanted0, refs, _ = full_capture
    gen = sample(family_adapter, batch, CFG, ["qa", "qb"])
    wanted = [[] for _ in gen.tokens]
    wanted[0] = [3, 1]  # unsorted on purpose
    k = gen.k
    wanted[k] = [2]
    assert len(gen.tokens[0]) >= 4 and len(gen.tokens[k]) >= 3
    maps = capture_rows(family_adapter, batch, gen, wanted, list(range(family_adapter.num_layers)))
    assert [r for r, m in enumerate(maps) if m is not None] == [0, k]
    assert (maps[0] - refs[0][[3, 1]]).abs().max().item() <= 1e-5
    assert (maps[k] - refs[k][[2]]).abs().max().item() <= 1e-5


def test_capture_nothing_wanted(family_adapter, batch):
    gen = sample(family_adapter, batch, CFG, ["qa", "qb"])
    assert capture_rows(family_adapter, batch, gen, [[] for _ in gen.tokens], [0, 1]) == [None] * len(gen.tokens)


# ------------------------------------------------------------------------------------ sampling


def test_sample_shapes_and_logprobs(family_adapter, batch):
    gen = sample(family_adapter, batch, CFG, ["qa", "qb"])
    assert gen.k == CFG.num_candidates + 1 and len(gen.tokens) == 2 * gen.k
    eos = set(family_adapter.eos_token_ids)
    for toks, lps in zip(gen.tokens, gen.logprobs):
        assert len(toks) == len(lps) <= CFG.max_new_tokens
        assert not eos & set(toks)
        assert all(lp <= 0 and math.isfinite(lp) for lp in lps)
    assert gen.mask.shape == (2 * gen.k, batch.inputs["input_ids"].shape[1])


def test_sample_same_seed_same_samples(family_adapter, batch):
    a = sample(family_adapter, batch, CFG, ["qa", "qb"])
    b = sample(family_adapter, batch, CFG, ["qa", "qb"])
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    c = sample(family_adapter, batch, SamplingConfig(num_candidates=3, max_new_tokens=8, seed=1), ["qa", "qb"])
    k = a.k
    assert [c.tokens[0], c.tokens[k]] == [a.tokens[0], a.tokens[k]]  # greedy rows do not depend on the seed
    assert c.tokens != a.tokens
    assert len({tuple(t) for t in a.tokens[1:k]}) > 1  # sampled rows differ from one another


def test_sample_independent_of_batch(family_adapter, make_image):
    """Also checks each family's positions: a left-padded query decodes as it does alone."""
    small, big = make_image(112, 84, seed=1), make_image(240, 112, seed=2)
    alone = sample(family_adapter, family_adapter.encode([small], ["red circle"]), CFG, ["A"])
    enc = family_adapter.encode([big, small], ["blue square", "red circle"])
    assert (enc.inputs["attention_mask"][1] == 0).any()  # A is left padded in the batch
    both = sample(family_adapter, enc, CFG, ["B", "A"])
    k = alone.k
    assert both.tokens[k:] == alone.tokens
    for x, y in zip(both.logprobs[k:], alone.logprobs):
        assert x == pytest.approx(y, abs=1e-4)


@torch.inference_mode()
def test_greedy_row_equals_generate(parrot_adapter, make_image):
    ad = parrot_adapter
    enc = ad.encode([make_image(112, 98, seed=3), make_image(168, 140, seed=4)], ["red circle", "blue square"])
    gen = sample(ad, enc, SamplingConfig(num_candidates=2, max_new_tokens=32, decode="full"), ["q0", "q1"])
    ref = ad.model.generate(**enc.inputs, do_sample=False, max_new_tokens=32)
    p = enc.inputs["input_ids"].shape[1]
    eos = ad.eos_token_ids[0]
    for q in range(2):
        row = ref[q, p:].tolist()
        row = row[: row.index(eos)] if eos in row else row
        assert gen.tokens[q * gen.k] == row
        assert '"bbox_2d": [10, 20, 50, 60]' in ad.tokenizer.decode(row)


@torch.inference_mode()
def test_greedy_row_equals_generate_every_family(family_adapter, batch):
    """The greedy row of `sample` (explicit positions, repeated cache) is what `generate` decodes."""
    ad = family_adapter
    gen = sample(ad, batch, SamplingConfig(num_candidates=1, max_new_tokens=8, decode="full"), ["q0", "q1"])
    ref = ad.model.generate(**batch.inputs, do_sample=False, max_new_tokens=8)
    p = batch.inputs["input_ids"].shape[1]
    eos = ad.eos_token_ids[0]
    for q in range(2):
        row = ref[q, p:].tolist()
        row = row[: row.index(eos)] if eos in row else row
        assert gen.tokens[q * gen.k] == row


# ------------------------------------------------------------------------------------ helpers


def test_pad_positions():
    idx, valid = pad_positions([torch.tensor([3, 4, 5]), torch.tensor([7])], "cpu")
    assert idx.tolist() == [[3, 4, 5], [7, 0, 0]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def test_entropy():
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(entropy(p), torch.tensor([math.log(4), 0.0, math.log(2)]))
