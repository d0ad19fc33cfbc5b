"""The Qwen2.5-VL adapter: loading, batch layout of visual tokens, coordinate maps, parsing."""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.models.base import Adapter, family_of, load_adapter

SIZES = [(112, 84), (60, 150), (200, 120)]  # (width, height): three different grids


# ------------------------------------------------------------------------------------ loading


def test_load_adapter_offline(tiny_adapter, tiny_model_dir):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert tiny_adapter.family == "qwen2.5-vl"
    assert family_of(str(tiny_model_dir)) == "qwen2.5-vl"
    assert tiny_adapter.model_id == str(tiny_model_dir)  # acs_model.json carries no model_id
    assert tiny_adapter.num_layers == 4 and tiny_adapter.num_heads == 4
    assert tiny_adapter.eos_token_ids == [tiny_adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert tiny_adapter.pad_token_id == tiny_adapter.tokenizer.convert_tokens_to_ids("<|endoftext|>")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig

    out = tmp_path_factory.mktemp("llama")
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64).save_pretrained(out)
    return out


def test_unsupported_model_type(llama_dir, tiny_adapter):
    with pytest.raises(ValueError, match=r"model type 'llama'.*has no adapter.*qwen2\.5-vl"):
        family_of(str(llama_dir))
    with pytest.raises(ValueError, match="has no adapter"):
        load_adapter(str(llama_dir), device="cpu")


def test_family_of_in_fresh_process(tiny_model_dir):
    code = ("from pipeline.models.base import family_of; import sys; "
            "print(family_of(sys.argv[1]))")
    res = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert res.returncode == 0, res.stderr[-500:]
    assert res.stdout.strip() == "qwen2.5-vl"


# ------------------------------------------------------------------------------------ encode


@pytest.fixture(scope="module")
def encoded(tiny_adapter, make_image):
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    cats = ["red circle", "blue square", "a much longer category name"]
    return images, cats, tiny_adapter.encode(images, cats)


def test_encode_layout(tiny_adapter, encoded):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    images, _, enc = encoded
    ip = tiny_adapter.processor.image_processor
    merge, patch = ip.merge_size, ip.patch_size
    ids, mask = enc.inputs["input_ids"], enc.inputs["attention_mask"]
    tok = tiny_adapter.tokenizer
    img_id = tiny_adapter.model.config.image_token_id
    start_id = tok.convert_tokens_to_ids("<|vision_start|>")
    end_id = tok.convert_tokens_to_ids("<|vision_end|>")
    assert ids.shape[0] == 3 and len(enc.visual_positions) == 3
    assert (mask[:, -1] == 1).all()  # left padded
    assert (mask == 0).any()  # the batch really has padding
    grids = []
    for i, im in enumerate(images):
        single = ip(images=[im], return_tensors="pt")["image_grid_thw"][0].tolist()
        assert enc.inputs["image_grid_thw"][i].tolist() == single
        t, h, w = single
        assert t == 1
        assert enc.grids[i] == (h // merge, w // merge)
        gh, gw = enc.grids[i]
        pos = enc.visual_positions[i]
        assert pos.numel() == gh * gw
        assert torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + gh * gw))
        pad = int((mask[i] == 0).sum())
        assert int(pos[0]) >= pad and (mask[i, pos] == 1).all()
        assert ids[i, pos[0] - 1] == start_id and ids[i, pos[-1] + 1] == end_id
        assert int((ids[i] == img_id).sum()) == gh * gw
        assert enc.input_sizes[i] == (gh * merge * patch, gw * merge * patch)
        assert enc.input_sizes[i] == smart_resize(im.height, im.width, factor=patch * merge,
                                                  min_pixels=ip.size["shortest_edge"],
                                                  max_pixels=ip.size["longest_edge"])
        assert enc.orig_sizes[i] == (im.height, im.width)
        grids.append((gh, gw))
    assert len(set(grids)) == 3
    n = [int(g.prod()) for g in enc.inputs["image_grid_thw"]]
    assert enc.inputs["pixel_values"].shape[0] == sum(n)
    assert enc.inputs["pixel_values"].dtype == tiny_adapter.model.dtype


def test_encode_prompt_text(tiny_adapter, encoded):
    _, cats, enc = encoded
    for i, c in enumerate(cats):
        text = tiny_adapter.tokenizer.decode(enc.inputs["input_ids"][i][enc.inputs["attention_mask"][i] == 1])
        assert f"Detect the {c} in the image. Output its bbox_2d in JSON." in text
        assert text.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------ coordinates


@pytest.fixture(params=["absolute", "norm1000"])
def coord_adapter(request, tiny_adapter):
    ad = copy.copy(tiny_adapter)
    ad.coord_system = request.param
    return ad


def test_to_from_original_round_trip(coord_adapter):
    from pipeline.boxes import RawBox

    rng = np.random.default_rng(0)
    for _ in range(200):
        ih, iw, oh, ow = rng.integers(28, 2000, size=4)
        box = tuple(float(v) for v in rng.uniform(-50, 2500, size=4))
        model_coords = coord_adapter.from_original(box, (ih, iw), (oh, ow))
        back = coord_adapter.to_original(RawBox(model_coords, ((0, 0),) * 4), (ih, iw), (oh, ow))
        np.testing.assert_allclose(back, box, rtol=0, atol=1e-6)


def test_coordinate_conventions(tiny_adapter):
    from pipeline.boxes import RawBox

    raw = RawBox((500.0, 250.0, 1000.0, 1000.0), ((0, 0),) * 4)
    ad = copy.copy(tiny_adapter)
    ad.coord_system = "norm1000"
    assert ad.to_original(raw, (84, 112), (200, 100)) == (50.0, 50.0, 100.0, 200.0)
    ad.coord_system = "absolute"
    assert ad.to_original(raw, (100, 1000), (200, 100)) == (50.0, 500.0, 100.0, 2000.0)
    assert tiny_adapter.coord_system == "absolute"


# ------------------------------------------------------------------------------------ parse


def _ids(ad, text):
    return ad.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_parse_answer_text_round_trip(tiny_adapter):
    ad = tiny_adapter
    rng = np.random.default_rng(1)
    for _ in range(30):
        ih, iw = (int(v) * 28 for v in rng.integers(2, 20, size=2))
        oh, ow = (int(v) for v in rng.integers(40, 900, size=2))
        x1, x2 = sorted(rng.uniform(0, ow, size=2))
        y1, y2 = sorted(rng.uniform(0, oh, size=2))
        box = (x1, y1, x2, y2)
        text = ad.answer_text(ad.from_original(box, (ih, iw), (oh, ow)), "red circle")
        ids = _ids(ad, text) + ad.eos_token_ids
        out_text, p = ad.parse(ids, (ih, iw), (oh, ow))
        assert out_text.startswith(text)
        assert p.error is None and p.box is not None
        tol = max(ow / iw, oh / ih) * 0.5 + 1e-9  # half a resized-input pixel, in original pixels
        assert np.abs(np.array(p.box) - np.array(box)).max() <= tol
        assert len(p.coord_tokens) == 4 and all(p.coord_tokens)
        written = text[text.index("[", 2) + 1:text.index("]")].split(", ")
        for toks, num in zip(p.coord_tokens, written):
            assert "".join(ad.tokenizer.decode([ids[i]]) for i in toks).strip() == num


def test_parse_fixes_reversed_and_outside(tiny_adapter):
    ad = tiny_adapter
    text, p = ad.parse(_ids(ad, '[{"bbox_2d": [50, 60, 10, 20], "label": "x"}]'), (84, 112), (84, 112))
    assert p.box == (10.0, 20.0, 50.0, 60.0) and p.box_fixed
    _, p = ad.parse(_ids(ad, '[{"bbox_2d": [10, 20, 500, 60]}]'), (84, 112), (168, 224))
    assert p.box == (20.0, 40.0, 224.0, 120.0) and p.box_fixed


@pytest.mark.parametrize("text", ["", "hello there", '[{"bbox_2d": [1, 2', '{"bbox_2d": [a, b, c, d]}'])
def test_parse_garbage_text(tiny_adapter, text):
    out_text, p = tiny_adapter.parse(_ids(tiny_adapter, text), (84, 112), (84, 112))
    assert out_text == text
    assert p.box is None and p.coord_tokens == [] and "no well-formed box" in p.error


def test_parse_box_outside_image(tiny_adapter):
    _, p = tiny_adapter.parse(_ids(tiny_adapter, "[200, 200, 300, 300]"), (84, 112), (84, 112))
    assert p.box is None and p.box_fixed and "empty inside the image" in p.error


def test_parse_random_ids_never_raises(tiny_adapter):
    ad = tiny_adapter
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 5, 40):
        for _ in range(10):
            ids = torch.randint(0, len(ad.tokenizer), (n,), generator=g).tolist()
            text, p = ad.parse(ids, (84, 112), (84, 112))
            assert isinstance(text, str)
            assert (p.box is None) == (p.error is not None)


def test_base_adapter_is_abstract(tiny_adapter):
    base = Adapter(tiny_adapter.model, tiny_adapter.processor, "x")
    with pytest.raises(NotImplementedError):
        base.encode([], [])
    with pytest.raises(NotImplementedError):
        base.answer_text((1, 2, 3, 4), "x")
