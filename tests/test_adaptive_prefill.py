"""Adaptive K's second round samples on the first round's prefill (pipeline/sampling.Prefill): the
same candidates and the same captured attention as a round that encodes and prefills again, for
every family, with the image and the prompt run once per query."""

import pytest
import torch

from pipeline.ground import GroundConfig, Grounder, Query
from pipeline.sampling import SamplingConfig, capture_rows, sample

SIZES = [(112, 84), (140, 112), (98, 98)]  # unequal prompts: the subset keeps the batch's padding
CATS = ["red circle", "blue square", "green triangle"]


def test_second_round_on_the_kept_prefill_equals_a_fresh_one(family_adapter, make_image):
    ad = family_adapter
    images = [make_image(w, h, seed=50 + i) for i, (w, h) in enumerate(SIZES)]
    keys = [f"q{i}" for i in range(len(SIZES))]
    enc = ad.encode(images, CATS, opening=True)
    first = sample(ad, enc, SamplingConfig(num_candidates=1, max_new_tokens=6), keys)
    kept = first.prefill.select([0, 1, 2])
    idx = [2, 0]  # a subset, out of order
    rest = SamplingConfig(num_candidates=3, max_new_tokens=6)
    sub_keys = [keys[i] + "#round2" for i in idx]
    fresh = sample(ad, ad.encode([images[i] for i in idx], [CATS[i] for i in idx], opening=True), rest, sub_keys,
                   greedy=False)
    sub = enc.select(idx)
    reused = sample(ad, sub, rest, sub_keys, greedy=False, prefill=kept.select(idx))
    assert reused.k == fresh.k == 3
    assert reused.tokens == fresh.tokens
    for a, b in zip(reused.logprobs, fresh.logprobs):
        assert a == pytest.approx(b, abs=1e-4)
    # The kept copy is untouched by the round that used a selection of it.
    assert kept.logits.shape[0] == 3 and kept.cache.get_seq_length() == enc.inputs["input_ids"].shape[1]
    # The capture pass on the reused round reads the same attention as on the fresh one.
    wanted = [[0, 2, 3] for _ in reused.tokens]
    layers = list(range(ad.num_layers))
    fresh_enc = ad.encode([images[i] for i in idx], [CATS[i] for i in idx], opening=True)
    a = capture_rows(ad, sub, reused, wanted, layers)
    b = capture_rows(ad, fresh_enc, fresh, wanted, layers)
    for x, y in zip(a, b):
        assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5)


def test_adaptive_ground_encodes_each_query_once(parrot_adapter, make_image, monkeypatch):
    """With no query agreeing (IoU > 1 is never reached) every query takes round 2, on round 1's
    prefill: `encode` (processor, and with it the vision tower's prefill) runs once per batch."""
    ad = parrot_adapter
    calls = []
    real = ad.encode
    monkeypatch.setattr(ad, "encode", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    qs = [Query(f"a{i}", make_image(w, h, seed=60 + i), c, gt=(5, 5, 40, 40)) for i, ((w, h), c) in
          enumerate(zip(SIZES, CATS))]
    n = 4
    cfg = GroundConfig(sampling=SamplingConfig(num_candidates=n), adaptive=True, adaptive_first=1, adaptive_iou=1.01)
    res = Grounder(ad, cfg).ground(qs)
    assert calls == [len(qs)]
    for r in res:
        assert [c.cand_idx for c in r.candidates] == list(range(n + 1))
        assert not any(c.status == "skipped" for c in r.candidates)  # nobody stopped: all sampled
