"""Tokenizer parity with transformers' GGUF tokenizer on the same file, special tokens, BOS,
chat templates, and streaming detokenization that never splits a UTF-8 character."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from driftwood.model.gguf import GGUFFile
from driftwood.model.tokenizer import Tokenizer

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.\nIt wasn't me; they'd say I'm fine.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # naive\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i] * b[i]; }",
    '{"key": [1, 2.5, -3e10], "nested": {"a": null}}',
    "héllo wörld — naïve café, Ωmega ≈ π ≤ ∞",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji: 🤗🚀👍🏽👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "   leading spaces", "trailing spaces   ", "tabs\tand\t\ttabs", "\n\n\nnewlines\r\n\r\nCRLF",
    "multiple     internal      spaces", " ", "", "\u00a0non-breaking\u2009thin\u200bzero-width",
    "Numbers 0 12 345 6789 3.14159 1,000,000 2024-11-22 0x1F",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|endoftext|>", "not special: <|im_start", "<repo_name>driftwood",
    "a" * 300, "ab" * 100 + " " * 40 + "end",
]


@pytest.fixture(scope="module")
def smol(smollm2_path) -> Tokenizer:
    with GGUFFile(smollm2_path) as f:
        return Tokenizer.from_gguf(f.metadata)


@pytest.mark.parametrize("text", CORPUS)
def test_smollm2_matches_transformers(smol, hf_smollm2_tokenizer, text):
    ours = smol.encode(text)
    ref = hf_smollm2_tokenizer(text, add_special_tokens=False).input_ids
    assert ours == ref
    assert smol.decode(ours) == hf_smollm2_tokenizer.decode(ref) == text


def _non_ascii_number(text: str) -> bool:
    return any(not c.isascii() and unicodedata.category(c).startswith("N") for c in text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=64))
def test_smollm2_matches_transformers_on_any_text(smol, hf_smollm2_tokenizer, text):
    assume(not _non_ascii_number(text))  # see test_smollm_splits_every_number_character
    assert smol.encode(text) == hf_smollm2_tokenizer(text, add_special_tokens=False).input_ids
    if _encodable(smol, text):
        assert smol.decode(smol.encode(text)) == text


def _encodable(tok: Tokenizer, text: str) -> bool:
    """Whether every byte of ``text`` has a token (SmolLM2's vocabulary lacks 21 of the 256
    byte tokens, e.g. the lead bytes of U+40000 and above, so those bytes are dropped)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    vocab = tok.backend.get_vocab()
    return all(spelling[b] in vocab for b in text.encode())


def test_smollm_splits_every_number_character(smol):
    """tokenizer.ggml.pre = smollm splits each \\p{N} character off first, as llama.cpp (and
    SmolLM2's own tokenizer.json, Digits(individual_digits)) do. transformers' GGUF loader
    ignores that setting and uses the plain GPT-2 split; for ASCII digits the results agree
    (the vocabulary has no merges across them), for other number characters they differ:
    " ¹" is [216, 43183] here and [3351, 134] there."""
    assert smol.encode(" ¹") == smol.encode(" ") + smol.encode("¹") == [216, 43183]
    assert smol.encode(" ٣4") == smol.encode(" ") + smol.encode("٣") + smol.encode("4")


@pytest.mark.parametrize("pre", ["llama-bpe", "smollm", "gpt2"])
def test_synthetic_matches_transformers(tiny_gguf, pre):
    import transformers

    path = tiny_gguf("f32", pre=pre)
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with GGUFFile(path) as f:
        tok = Tokenizer.from_gguf(f.metadata)
    # transformers' GPT2Tokenizer adds "<|endoftext|>" as a new token past the vocabulary
    # when the file has none, so texts with it are left out here
    texts = [t for t in CORPUS if "<|endoftext|>" not in t]
    for text in [*texts, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
                 "<think>reasoning</think> done"]:
        assert tok.encode(text, add_bos=False) == ref(text, add_special_tokens=False).input_ids, text


def test_special_tokens_are_parsed_unless_asked_not_to(smol):
    assert smol.encode("<|im_start|>") == [1]
    plain = smol.encode("<|im_start|>", parse_special=False)
    assert 1 not in plain and smol.decode(plain) == "<|im_start|>"


def test_bos_follows_the_metadata(smol, tiny_gguf):
    assert smol.add_bos is False and smol.encode("hi")[0] != smol.bos_id
    with GGUFFile(tiny_gguf("f32", pre="llama-bpe")) as f:
        llama3 = Tokenizer.from_gguf(f.metadata)
    assert llama3.add_bos is True
    assert llama3.encode("hi")[0] == llama3.bos_id
    assert llama3.encode("hi", add_bos=False)[0] != llama3.bos_id


def test_stop_ids(smol):
    assert smol.eos_id == 2 and 2 in smol.stop_ids  # <|im_end|>
    assert 0 in smol.stop_ids  # <|endoftext|>, an end-of-generation name llama.cpp knows


def test_chat_template_matches_transformers(smol, hf_smollm2_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    for conversation in (messages, messages[1:2]):
        ref = hf_smollm2_tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                       tokenize=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert smol.apply_chat_template(conversation) == list(ref)


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = tok.detokenizer(skip_special=False)
    return [detok.add(i) for i in ids] + [detok.flush()]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=0, max_value=49151), max_size=40))
def test_streaming_concatenates_to_decode(smol, ids):
    """Any id sequence (including byte tokens that split characters and invalid UTF-8):
    the streamed pieces concatenate to the one-shot decode, so no piece ever carries a
    replacement character for bytes a later token completes."""
    assert "".join(_stream(smol, ids)) == smol.decode(ids)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_streaming_valid_text_never_emits_replacement(smol, text):
    """For tokenized text, no streamed piece contains U+FFFD unless the one-shot decode does."""
    ids = smol.encode(text)
    pieces = _stream(smol, ids)
    assert "".join(pieces) == smol.decode(ids)
    if "\ufffd" not in smol.decode(ids):
        assert all("\ufffd" not in p for p in pieces)


def test_streaming_holds_back_partial_characters(smol):
    ids = smol.encode("🤗")  # one character, several byte tokens
    assert len(ids) > 1
    pieces = _stream(smol, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and "".join(pieces) == "🤗"
