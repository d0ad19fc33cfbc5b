"""Box parsing, clamping and the character -> token mapping (pipeline/boxes.py)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.boxes import clamp_box, find_box, token_char_ends, tokens_for_spans

# ------------------------------------------------------------------------------------ find_box


def _span_texts(text, raw):
    return [text[s:e] for s, e in raw.spans]


def test_find_box_qwen_json():
    text = '[{"bbox_2d": [1, 2, 3, 4], "label": "x"}]'
    raw = find_box(text)
    assert raw.values == (1.0, 2.0, 3.0, 4.0)
    assert _span_texts(text, raw) == ["1", "2", "3", "4"]
    assert raw.spans[0] == (text.index("1"), text.index("1") + 1)


def test_find_box_floats_and_negatives():
    text = '{"bbox_2d": [-12.5, 0.25, 300, -4]}'
    raw = find_box(text)
    assert raw.values == (-12.5, 0.25, 300.0, -4.0)
    assert _span_texts(text, raw) == ["-12.5", "0.25", "300", "-4"]


def test_find_box_whitespace_and_unquoted_key():
    raw = find_box('bbox: [ 5 ,6,  7 , 8 ]')
    assert raw.values == (5.0, 6.0, 7.0, 8.0)


def test_find_box_first_of_two_wins():
    text = '[{"bbox_2d": [10, 20, 30, 40]}, {"bbox_2d": [50, 60, 70, 80]}]'
    raw = find_box(text)
    assert raw.values == (10.0, 20.0, 30.0, 40.0)
    assert _span_texts(text, raw) == ["10", "20", "30", "40"]


def test_find_box_keyed_preferred_over_earlier_bare_list():
    text = 'see [1, 1, 1, 1] then {"bbox_2d": [5, 6, 7, 8]}'
    raw = find_box(text)
    assert raw.values == (5.0, 6.0, 7.0, 8.0)
    assert raw.spans[0][0] == text.index("5")


def test_find_box_fallback_bare_list():
    text = "the object is at [11, 22, 33, 44]."
    raw = find_box(text)
    assert raw.values == (11.0, 22.0, 33.0, 44.0)
    assert _span_texts(text, raw) == ["11", "22", "33", "44"]


def test_find_box_truncated_falls_through_to_later_box():
    raw = find_box('[{"bbox_2d": [1, 2, 3 ... [7, 8, 9, 10]')
    assert raw.values == (7.0, 8.0, 9.0, 10.0)


def test_find_box_internvl_ref_box():
    text = "<ref>red circle</ref><box>[[12, 340, 56, 1000]]</box>"
    raw = find_box(text)
    assert raw.values == (12.0, 340.0, 56.0, 1000.0)
    assert _span_texts(text, raw) == ["12", "340", "56", "1000"]


@pytest.mark.parametrize("text", [
    "<box>[12, 340, 56, 1000]</box>",  # without the outer brackets
    "<box> [[ 12 ,340, 56,1000 ]] </box>",  # loose whitespace
    "<ref>a</ref><box>[[12, 340, 56, 1000], [1, 2, 3, 4]]</box>",  # several boxes: the first
])
def test_find_box_internvl_variants(text):
    assert find_box(text).values == (12.0, 340.0, 56.0, 1000.0)


def test_find_box_internvl_box_preferred_over_earlier_bare_list():
    text = "<ref>the [1, 2, 3, 4] sign</ref><box>[[5, 6, 7, 8]]</box>"
    raw = find_box(text)
    assert raw.values == (5.0, 6.0, 7.0, 8.0)
    assert raw.spans[0][0] == text.index("5")


def test_find_box_qwen3_fenced_json():
    text = '```json\n[\n\t{"bbox_2d": [105, 220, 480, 999], "label": "cat"}\n]\n```'
    raw = find_box(text)
    assert raw.values == (105.0, 220.0, 480.0, 999.0)
    assert _span_texts(text, raw) == ["105", "220", "480", "999"]


@pytest.mark.parametrize("text", [
    '[{"bbox_2d": [1, 2, 3',  # truncated
    '[{"bbox_2d": [1, 2, 3]}]',  # three numbers
    '[{"bbox_2d": [a, b, c, d]}]',  # non-numeric
    '[{"bbox_2d": [1, 2, "3", 4]}]',  # quoted number
    '[{"bbox_2d": [1, 2, 3, 4.]}]',  # malformed float
    "no box here",
    "",
])
def test_find_box_none(text):
    assert find_box(text) is None


def test_find_box_non_string_and_overflow():
    assert find_box(None) is None
    assert find_box(b"[1, 2, 3, 4]") is None
    assert find_box("[" + "9" * 400 + ", 1, 2, 3]") is None  # float overflows to inf


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_find_box_never_raises_and_spans_parse(text):
    raw = find_box(text)
    if raw is not None:
        assert len(raw.values) == 4 and len(raw.spans) == 4
        assert [float(text[s:e]) for s, e in raw.spans] == list(raw.values)
        assert all(raw.spans[i][1] <= raw.spans[i + 1][0] for i in range(3))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20), st.lists(st.integers(-5000, 5000), min_size=4, max_size=4), st.text(max_size=20))
def test_find_box_finds_embedded_box(prefix, nums, suffix):
    body = '"bbox_2d": [' + ", ".join(map(str, nums)) + "]"
    text = prefix + body + suffix
    raw = find_box(text)
    assert raw is not None
    if "bbox" not in prefix and "[" not in prefix:
        assert raw.values == tuple(map(float, nums))
        assert raw.spans[0][0] == len(prefix) + body.index("[") + 1


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=20), st.lists(st.integers(0, 1000), min_size=4, max_size=4), st.text(max_size=20))
def test_find_box_finds_embedded_internvl_box(prefix, nums, suffix):
    body = "<box>[[" + ", ".join(map(str, nums)) + "]]</box>"
    raw = find_box(prefix + body + suffix)
    assert raw is not None
    if "bbox" not in prefix and "[" not in prefix and "<box>" not in prefix:
        assert raw.values == tuple(map(float, nums))
        assert raw.spans[0][0] == len(prefix) + body.index("[[") + 2


# ------------------------------------------------------------------------------------ clamp_box


def test_clamp_box_inside_untouched():
    assert clamp_box((1, 2, 30, 40), 100, 50) == ((1, 2, 30, 40), False)


def test_clamp_box_reorders_reversed():
    assert clamp_box((30, 40, 1, 2), 100, 50) == ((1, 2, 30, 40), True)
    assert clamp_box((1, 40, 30, 2), 100, 50) == ((1, 2, 30, 40), True)


def test_clamp_box_clamps_out_of_range():
    assert clamp_box((-5, -1, 120, 60), 100, 50) == ((0, 0, 100, 50), True)
    assert clamp_box((10, 10, 120, 20), 100, 50) == ((10, 10, 100, 20), True)


@pytest.mark.parametrize("box", [
    (120, 10, 150, 20),  # right of the image
    (10, 60, 20, 70),  # below
    (-20, -20, -1, -1),  # above-left
    (10, 10, 10, 20),  # zero width
    (10, 10, 20, 10),  # zero height
])
def test_clamp_box_empty_is_none(box):
    out, _ = clamp_box(box, 100, 50)
    assert out is None


def test_clamp_box_flag_for_empty_boxes():
    assert clamp_box((10, 10, 10, 20), 100, 50) == (None, False)
    assert clamp_box((120, 10, 150, 20), 100, 50) == (None, True)


# ------------------------------------------------------------------------------------ tokens


@pytest.fixture(scope="module")
def project_tokenizer():
    from pipeline.models.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def digit_tokenizer():
    """A byte-level BPE that spells every number digit by digit (as the real Qwen vocabulary does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ['[{"bbox_2d": [%d, %d, %d, %d], "label": "red circle"}]' % (i, 2 * i, 3 * i + 7, 999 - i)
              for i in range(200)]
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


ANSWER = '[{"bbox_2d": [7, 23, 345, 1000], "label": "red circle"}]'


def _coord_tokens(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ends = token_char_ends(tok, ids)
    raw = find_box(tok.decode(ids, clean_up_tokenization_spaces=False))
    return ids, ends, raw, tokens_for_spans(ends, raw.spans)


def test_token_char_ends_cover_text(project_tokenizer, digit_tokenizer):
    for tok in (project_tokenizer, digit_tokenizer):
        ids = tok(ANSWER, add_special_tokens=False)["input_ids"]
        ends = token_char_ends(tok, ids)
        assert len(ends) == len(ids)
        assert ends == sorted(ends) and ends[-1] == len(ANSWER)
        pieces = [ANSWER[a:b] for a, b in zip([0] + ends[:-1], ends)]
        assert pieces == [tok.decode([i], clean_up_tokenization_spaces=False) for i in ids]


def test_tokens_for_spans_digit_tokenizer(digit_tokenizer):
    tok = digit_tokenizer
    ids, ends, raw, spans = _coord_tokens(tok, ANSWER)
    assert [len(s) for s in spans] == [1, 2, 3, 4]
    for toks, num in zip(spans, ["7", "23", "345", "1000"]):
        assert toks == list(range(toks[0], toks[0] + len(toks)))  # contiguous
        assert [tok.decode([ids[i]]) for i in toks] == list(num)


def test_tokens_for_spans_project_tokenizer(project_tokenizer):
    tok = project_tokenizer
    ids, ends, raw, spans = _coord_tokens(tok, ANSWER)
    assert [len(s) for s in spans] == [1, 1, 1, 1]
    assert [tok.decode([ids[s[0]]]) for s in spans] == ["7", "23", "345", "1000"]


def test_tokens_for_spans_after_multibyte_text(digit_tokenizer):
    """Byte-level pieces of non-ASCII characters before the box do not shift the mapping."""
    tok = digit_tokenizer
    text = 'é😀 ñ {"bbox_2d": [12, 5, 678, 90]}'
    ids, ends, raw, spans = _coord_tokens(tok, text)
    assert raw.values == (12.0, 5.0, 678.0, 90.0)
    for toks, num in zip(spans, ["12", "5", "678", "90"]):
        assert "".join(tok.decode([ids[i]]) for i in toks) == num


def test_tokens_for_spans_hand_example():
    # tokens: "ab" | "12" | "3," | "4"  -> ends 2, 4, 6, 7
    ends = [2, 4, 6, 7]
    assert tokens_for_spans(ends, [(2, 5), (6, 7), (0, 1)]) == [[1, 2], [3], [0]]
