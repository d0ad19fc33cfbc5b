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


# ------------------------------------------------------------------------------------ every family
# The same contract for every supported family (tiny random-weight models of the real architectures).

COORD_SYSTEMS = {"qwen2.5-vl": "absolute", "qwen3-vl": "norm1000", "internvl3.5": "norm1000"}
TOKEN_PX = {"qwen2.5-vl": 28, "qwen3-vl": 32, "internvl3.5": 28}  # input pixels per visual token (tiny)
BOX_INSTRUCTIONS = {
    "qwen2.5-vl": "Output its bbox_2d in JSON.",
    "qwen3-vl": "Report its bbox_2d coordinates in JSON format.",
    "internvl3.5": "Please provide the bounding box coordinate of the region this sentence describes: <ref>{c}</ref>",
}


def test_family_registry_and_loading(family, family_dir, family_adapter):
    from pipeline.models.base import ADAPTERS, MODEL_TYPES

    assert set(ADAPTERS) >= set(COORD_SYSTEMS)
    assert {"qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "internvl"} <= set(MODEL_TYPES)
    assert family_of(str(family_dir)) == family == family_adapter.family
    assert family_adapter.coord_system == COORD_SYSTEMS[family]
    assert family_adapter.layout_info()["family"] == family
    assert family_adapter.num_layers == 4 and family_adapter.num_heads == 4
    tok = family_adapter.tokenizer
    assert family_adapter.eos_token_ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert family_adapter.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")


def test_family_of_in_fresh_process(tiny_model_dir, tiny_qwen3_vl_dir, tiny_internvl_dir):
    """Importing `base` alone is enough for `family_of` to know every family."""
    code = ("from pipeline.models.base import family_of; import sys; "
            "print(' '.join(family_of(d) for d in sys.argv[1:]))")
    dirs = [str(d) for d in (tiny_model_dir, tiny_qwen3_vl_dir, tiny_internvl_dir)]
    res = subprocess.run([sys.executable, "-c", code, *dirs], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert res.returncode == 0, res.stderr[-500:]
    assert res.stdout.split() == ["qwen2.5-vl", "qwen3-vl", "internvl3.5"]


FAMILY_SIZES = [(112, 84), (60, 150), (240, 112), (200, 120)]  # (width, height)


@pytest.fixture(scope="module")
def family_encoded(family_adapter, make_image):
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(FAMILY_SIZES)]
    cats = ["red circle", "blue square", "a much longer category name", "cat"]
    return images, cats, family_adapter.encode(images, cats)


def test_family_visual_span_and_grid(family, family_adapter, family_encoded):
    """Visual positions are image-token positions of the item, one per grid cell, inside the real
    (unpadded) prompt; the grid covers the resized input at the family's pixels per token."""
    images, _, enc = family_encoded
    ids, mask = enc.inputs["input_ids"], enc.inputs["attention_mask"]
    img_id = family_adapter.model.config.image_token_id
    assert (mask[:, -1] == 1).all() and (mask == 0).any()  # left padded, with padding
    for i, im in enumerate(images):
        gh, gw = enc.grids[i]
        pos = enc.visual_positions[i]
        assert pos.numel() == gh * gw == len(set(pos.tolist()))
        assert (ids[i, pos] == img_id).all() and (mask[i, pos] == 1).all()
        assert enc.input_sizes[i] == (gh * TOKEN_PX[family], gw * TOKEN_PX[family])
        assert enc.orig_sizes[i] == (im.height, im.width)
        n_img = int((ids[i] == img_id).sum())
        if family == "internvl3.5":
            per_view = family_adapter.processor.image_seq_length
            assert n_img % per_view == 0 and (n_img == per_view) == (gh * gw == per_view)
        else:  # one contiguous span in raster order of the merged grid
            assert n_img == gh * gw
            assert torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + gh * gw))
        # the aspect ratio of the grid follows the image's
        assert (gw - gh) * (im.width - im.height) >= 0


def test_family_prompt_text(family, family_adapter, family_encoded):
    _, cats, enc = family_encoded
    for i, c in enumerate(cats):
        text = family_adapter.tokenizer.decode(enc.inputs["input_ids"][i][enc.inputs["attention_mask"][i] == 1])
        assert f"Detect the {c} in the image. " + BOX_INSTRUCTIONS[family].format(c=c) in text
        assert text.endswith("<|im_start|>assistant\n")


def test_family_coordinates_round_trip(family_adapter, family_encoded):
    from pipeline.boxes import RawBox

    _, _, enc = family_encoded
    rng = np.random.default_rng(0)
    for isz, osz in zip(enc.input_sizes, enc.orig_sizes):
        for _ in range(50):
            box = tuple(float(v) for v in rng.uniform(-20, 300, size=4))
            model_coords = family_adapter.from_original(box, isz, osz)
            back = family_adapter.to_original(RawBox(model_coords, ((0, 0),) * 4), isz, osz)
            np.testing.assert_allclose(back, box, rtol=0, atol=1e-6)


def test_family_parse_answer_text_round_trip(family_adapter, family_encoded):
    """answer_text -> tokens -> parse gives the box back (to the rounding of the written integers),
    and each coordinate's tokens spell exactly the written number."""
    from pipeline.boxes import find_box

    ad = family_adapter
    _, _, enc = family_encoded
    rng = np.random.default_rng(1)
    for isz, (oh, ow) in zip(enc.input_sizes, enc.orig_sizes):
        for _ in range(10):
            # at least ~10% of the image wide and high, so the rounded box never collapses
            x1, x2 = rng.uniform(0, 0.45 * ow), rng.uniform(0.55 * ow, ow)
            y1, y2 = rng.uniform(0, 0.45 * oh), rng.uniform(0.55 * oh, oh)
            box = (x1, y1, x2, y2)
            text = ad.answer_text(ad.from_original(box, isz, (oh, ow)), "red circle")
            ids = _ids(ad, text) + ad.eos_token_ids
            out_text, p = ad.parse(ids, isz, (oh, ow))
            assert out_text.startswith(text)
            assert p.error is None and p.box is not None
            # half a unit of the written coordinates, in original pixels
            unit = (ow / 1000, oh / 1000) if ad.coord_system == "norm1000" else (ow / isz[1], oh / isz[0])
            assert np.abs(np.array(p.box) - np.array(box)).max() <= 0.5 * max(unit) + 1e-9
            written = [text[s:e] for s, e in find_box(text).spans]
            assert len(p.coord_tokens) == 4 and all(p.coord_tokens)
            for toks, num in zip(p.coord_tokens, written):
                assert "".join(ad.tokenizer.decode([ids[i]]) for i in toks).strip() == num


def test_family_answer_formats(family, family_adapter):
    text = family_adapter.answer_text((1.2, 20, 300.4, 999.6), "cat")
    want = {"qwen2.5-vl": '[{"bbox_2d": [1, 20, 300, 1000], "label": "cat"}]',
            "qwen3-vl": '```json\n[\n\t{"bbox_2d": [1, 20, 300, 1000], "label": "cat"}\n]\n```',
            "internvl3.5": "<ref>cat</ref><box>[[1, 20, 300, 1000]]</box>"}[family]
    assert text == want


def test_family_query_with_special_tokens_rejected(family, family_adapter):
    bad = "<IMG_CONTEXT>" if family == "internvl3.5" else "<|image_pad|>"
    assert "special token" in family_adapter.check_query(f"red {bad} circle")
    assert family_adapter.check_query("red circle") is None


# ------------------------------------------------------------------------------------ InternVL layout


def test_internvl_tiles_layout(tiny_internvl_adapter, make_image):
    """Tiles + thumbnail: the tiles' tokens stitched row-major into one grid, the thumbnail left out;
    a single tile (no thumbnail) is the whole image."""
    from pipeline.models.internvl import tile_canvas

    ad = tiny_internvl_adapter
    ip = ad.processor.image_processor
    per_view, s, tile = ad.processor.image_seq_length, ad.tokens_per_side, ad.tile_size
    assert ad.visual_layout == "tiles" and (s, tile) == (4, 112) and per_view == 16
    images = [make_image(240, 112, seed=1), make_image(100, 260, seed=2), make_image(90, 80, seed=3)]
    enc = ad.encode(images, ["a", "b", "c"])
    ids = enc.inputs["input_ids"]
    for i, im in enumerate(images):
        rows, cols = tile_canvas(im.height, im.width, tile, ip.min_patches, ip.max_patches)
        span = (ids[i] == ad.model.config.image_token_id).nonzero().flatten()
        views = rows * cols + (1 if rows * cols > 1 else 0)
        assert span.numel() == views * per_view
        assert ids[i, span[0] - 1] == ad.tokenizer.convert_tokens_to_ids("<img>")
        assert ids[i, span[-1] + 1] == ad.tokenizer.convert_tokens_to_ids("</img>")
        assert enc.grids[i] == (rows * s, cols * s)
        assert enc.input_sizes[i] == (rows * tile, cols * tile)
        grid = enc.visual_positions[i].reshape(rows * s, cols * s)
        for r in range(rows * s):
            for c in range(cols * s):
                k = int((span == grid[r, c]).nonzero())  # index of the token within the span
                view, cell = divmod(k, per_view)
                assert view == (r // s) * cols + c // s  # tile of this cell, row-major
                assert cell == (r % s) * s + c % s  # raster order inside the tile
        assert not set(span[rows * cols * per_view:].tolist()) & set(grid.flatten().tolist())
    assert [enc.grids[i] for i in range(3)] == [(4, 8), (12, 4), (4, 4)]  # 2x1, 1x3, 1 tile


def test_internvl_thumbnail_layout(tiny_internvl_adapter, make_image):
    from pipeline.models.internvl import InternVLAdapter

    base = tiny_internvl_adapter
    ad = InternVLAdapter(base.model, base.processor, base.model_id, layout="thumbnail")
    assert ad.layout_info() == {"family": "internvl3.5", "coord_system": "norm1000", "visual_layout": "thumbnail"}
    assert base.visual_layout == "tiles"  # the class default is untouched
    images = [make_image(240, 112, seed=1), make_image(90, 80, seed=3)]
    enc = ad.encode(images, ["a", "b"])
    for i in range(2):
        span = (enc.inputs["input_ids"][i] == ad.model.config.image_token_id).nonzero().flatten()
        assert torch.equal(enc.visual_positions[i], span[-16:])  # the thumbnail (or the only tile)
        assert enc.grids[i] == (4, 4) and enc.input_sizes[i] == (112, 112)
    with pytest.raises(ValueError, match="layout must be one of"):
        InternVLAdapter(base.model, base.processor, base.model_id, layout="mosaic")


def test_internvl_tile_order_follows_the_image(tiny_internvl_adapter):
    """The processor's tiles are row-major over the image (what the stitched grid assumes)."""
    from PIL import Image

    ad = tiny_internvl_adapter
    wide = Image.new("RGB", (240, 112), (255, 0, 0))
    wide.paste((0, 0, 255), (120, 0, 240, 112))  # left red, right blue
    tall = Image.new("RGB", (112, 240), (255, 0, 0))
    tall.paste((0, 0, 255), (0, 120, 112, 240))  # top red, bottom blue
    for im in (wide, tall):
        px = ad.processor(text=["<IMG_CONTEXT>"], images=[im], return_tensors="pt")["pixel_values"]
        assert px.shape[0] == 3  # 2 tiles + thumbnail
        red, blue = px[0].mean((1, 2)), px[1].mean((1, 2))
        assert red[0] > red[2] and blue[2] > blue[0]


def test_internvl_pixel_shuffle_is_raster(tiny_internvl_adapter):
    """Token t of a view covers the 2x2 patch block (t // s, t % s): the raster order `encode` uses."""
    model = tiny_internvl_adapter.model.model
    n = 8  # patches per side -> s = 4 tokens per side
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    feats = torch.stack([rows, cols], -1).float()[None]  # (1, n, n, 2): each patch holds its (row, col)
    out = model.pixel_shuffle(feats, scale_factor=0.5).reshape(1, -1, 8)  # (1, s*s, 4 patches x 2)
    s = n // 2
    for t in range(s * s):
        patch_rc = out[0, t].reshape(4, 2)
        assert set(patch_rc[:, 0].long().tolist()) == {2 * (t // s), 2 * (t // s) + 1}
        assert set(patch_rc[:, 1].long().tolist()) == {2 * (t % s), 2 * (t % s) + 1}


# ------------------------------------------------------------------------------------ big shapes


@pytest.mark.parametrize("family,shape,dims", [
    ("qwen3-vl", "8b", dict(hidden=4096, heads=32, kv=8, ffn=12288, head_dim=128, v_hidden=1152, v_depth=27,
                            v_heads=16, patch=16)),
    ("internvl3.5", "8b", dict(hidden=4096, heads=32, kv=8, ffn=12288, head_dim=128, v_hidden=1024, v_depth=24,
                               v_heads=16, patch=14)),
])
def test_8b_shapes_only_build_requested_layers(family, shape, dims):
    """The 8b shapes have the real checkpoints' dimensions, and only `layers` text layers exist."""
    import transformers

    from pipeline.models.tiny import DEFAULT_8B_LAYERS, MODEL_CLASSES, family_config
    from pipeline.models.tokenizer import build_tokenizer

    tok = build_tokenizer(family=family)
    cfg = family_config(family, shape, tok)
    t, v = cfg.get_text_config(), cfg.vision_config
    assert t.num_hidden_layers == DEFAULT_8B_LAYERS < 36
    assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size, t.head_dim) == (
        dims["hidden"], dims["heads"], dims["kv"], dims["ffn"], dims["head_dim"])
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads) == (dims["v_hidden"], dims["v_depth"],
                                                                           dims["v_heads"])
    patch = v.patch_size if isinstance(v.patch_size, int) else v.patch_size[0]
    assert patch == dims["patch"]
    if family == "qwen3-vl":
        assert v.out_hidden_size == 4096 and list(v.deepstack_visual_indexes) == [8, 16, 24]
        assert t.rope_parameters["mrope_section"] == [24, 20, 20]
    else:
        assert t.model_type == "qwen3" and tuple(v.image_size) == (448, 448) and cfg.image_seq_length == 256
    cfg2 = family_config(family, shape, tok, layers=2)
    with torch.device("meta"):  # shapes only, no memory
        model = getattr(transformers, MODEL_CLASSES[family])(cfg2)
    decoder = model.model.language_model.layers
    assert len(decoder) == 2
    assert decoder[0].self_attn.q_proj.weight.shape == (dims["heads"] * dims["head_dim"], dims["hidden"])
    assert decoder[0].self_attn.k_proj.weight.shape == (dims["kv"] * dims["head_dim"], dims["hidden"])


def test_unknown_family_or_shape(tmp_path):
    from pipeline.models.tiny import make_tiny_model

    with pytest.raises(ValueError, match="unknown family"):
        make_tiny_model(tmp_path, family="llava")
    with pytest.raises(ValueError, match="unknown shape '7b' for qwen3-vl"):
        make_tiny_model(tmp_path, family="qwen3-vl", shape="7b")
