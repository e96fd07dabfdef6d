"""Tokenizer built from a GGUF's ``tokenizer.ggml.*`` metadata with the ``tokenizers`` package.

Byte-level BPE (``tokenizer.ggml.model = gpt2``) with the pre-tokenizer the file names in
``tokenizer.ggml.pre``, split the way llama.cpp splits it. Control tokens (type 3) become
special added tokens and user-defined ones (type 4) plain added tokens, so both are matched
whole in text. Streaming detokenization goes through ``tokenizers.decoders.DecodeStream``,
which holds a token back until its bytes complete a UTF-8 character.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from driftwood.errors import ModelError, UnsupportedModel

# llama.cpp's LLAMA3 pre-tokenizer regex (llama-vocab.cpp), as Meta's tokenizer.json has it.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_gpt2() -> pre_tokenizers.PreTokenizer:  # "\p{N}" first, then the GPT-2 regex
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _llama3() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> (pre-tokenizer, ignore_merges, add_bos default)
PRE_TOKENIZERS: dict[str, tuple[Any, bool, bool]] = {
    "gpt2": (_gpt2, False, False),
    "smollm": (_digits_gpt2, False, False),
    "starcoder": (_digits_gpt2, False, False),
    "llama-bpe": (_llama3, True, True),
    "llama3": (_llama3, True, True),
    "llama-v3": (_llama3, True, True),
}

CONTROL, USER_DEFINED = 3, 4
# Control tokens llama.cpp also treats as end-of-generation, by their text.
_EOG_NAMES = frozenset(
    {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
     "<|end_of_text|>", "<EOT>", "<|return|>", "<|call|>"}
)


class Tokenizer:
    """Encode text to token ids and back, as llama.cpp does for this GGUF's vocabulary."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        stop_ids: frozenset[int],
        chat_template: str | None,
        vocab_size: int,
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.stop_ids = stop_ids
        self.chat_template = chat_template
        self.vocab_size = vocab_size

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModel(
                f"unsupported tokenizer model {kind!r} (supported: gpt2, i.e. byte-level BPE)"
            )
        pre = metadata.get("tokenizer.ggml.pre", "gpt2")
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedModel(
                f"unsupported pre-tokenizer {pre!r} (supported: {', '.join(PRE_TOKENIZERS)})"
            )
        make_pre, ignore_merges, bos_default = PRE_TOKENIZERS[pre]
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
        if len(types) != len(tokens):
            raise ModelError("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")

        vocab = {t: i for i, t in enumerate(tokens)}
        backend = _Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        backend.pre_tokenizer = make_pre()
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True) if k == CONTROL]
        )
        backend.add_tokens(
            [AddedToken(t, special=False, normalized=False)
             for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED]
        )

        def token_id(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
        stops = {i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None}
        stops |= {i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k == CONTROL and t in _EOG_NAMES}
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", bos_default)) and bos is not None
        return cls(
            backend,
            bos_id=bos,
            eos_id=eos,
            add_bos=add_bos,
            stop_ids=frozenset(stops),
            chat_template=metadata.get("tokenizer.chat_template"),
            vocab_size=len(tokens),
        )

    def encode(
        self, text: str, *, add_bos: bool | None = None, parse_special: bool = True
    ) -> list[int]:
        """Token ids for ``text``. Special tokens written in the text are matched unless
        ``parse_special`` is False; BOS is prepended per the model's metadata unless overridden."""
        backend = self.backend if parse_special else self._literal
        ids: list[int] = backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    @functools.cached_property
    def _literal(self) -> _Backend:
        """A copy of the backend that reads special-token text as plain text. (Toggling the
        flag on the shared backend around each call would race between threads.)"""
        literal = _Backend.from_str(self.backend.to_str())
        literal.encode_special_tokens = True
        return literal

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token(self, token_id: int) -> str | None:
        """The vocabulary entry for an id, as stored (byte-level spelling)."""
        return self.backend.id_to_token(token_id)

    def detokenizer(self, *, skip_special: bool = True) -> Detokenizer:
        return Detokenizer(self, skip_special=skip_special)

    def chat_prompt(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """``messages`` rendered with the file's chat template, as prompt text."""
        from driftwood.model.chat import render_chat

        if not self.chat_template:
            raise ModelError("this model has no chat template (tokenizer.chat_template)")
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.token(self.bos_id) if self.bos_id is not None else "",
            eos_token=self.token(self.eos_id) if self.eos_id is not None else "",
            **kwargs,
        )

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of :meth:`chat_prompt` (special tokens parsed; no BOS beyond what the
        template writes)."""
        text = self.chat_prompt(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_bos=False)


class Detokenizer:
    """Incremental detokenization for streaming: ``add(id)`` returns the text that became
    final with that token ("" while a UTF-8 character is still incomplete); ``flush()``
    returns whatever is still held back once the stream ends. The pieces concatenate to
    ``decode(all ids)``."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._stream = decoders.DecodeStream(skip_special_tokens=skip_special)
        self._pending: list[int] = []

    def add(self, token_id: int) -> str:
        self._pending.append(token_id)
        piece = self._stream.step(self._tokenizer.backend, token_id)
        if piece is None:
            return ""
        self._pending.clear()
        return piece

    def flush(self) -> str:
        text = self._tokenizer.decode(self._pending, skip_special=self._skip_special)
        self._pending.clear()
        self._stream = decoders.DecodeStream(skip_special_tokens=self._skip_special)
        return text
