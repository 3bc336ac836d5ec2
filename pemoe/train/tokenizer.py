"""Tokenizers for ``pemoe train``: a built-in byte-level one (no downloads) or a local SentencePiece model.

:class:`ByteTokenizer` maps text to its UTF-8 bytes shifted by 3: id 0 = pad (also T5's decoder start),
1 = eos, 2 = unk (unused), byte b -> b + 3; vocabulary 259 ids. It needs no files, so a random-initialised
T5 with ``vocab_size >= 259`` trains on any text; it is NOT compatible with pretrained T5 checkpoints,
whose vocabulary is SentencePiece: give those :class:`SentencePieceTokenizer` a local ``spiece.model``
(requires the ``sentencepiece`` package). A transformers causal LM folder's own tokenizer (``tokenizer.json`` /
``tokenizer_config.json``) is read by :class:`TransformersTokenizer`.
"""

from __future__ import annotations

import pathlib

__all__ = ["ByteTokenizer", "SentencePieceTokenizer", "Tokenizer", "TransformersTokenizer", "tokenizer_from_spec"]

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class ByteTokenizer:
    """UTF-8 bytes + 3 (pad 0, eos 1, unk 2); ``vocab_size`` 259."""

    kind = "bytes"
    pad_id, eos_id = PAD_ID, EOS_ID
    offset = 3
    vocab_size = 256 + 3

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256)
        return data.decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"kind": self.kind}


class SentencePieceTokenizer:
    """A local SentencePiece model (e.g. a T5 checkpoint's ``spiece.model``); pad 0, eos 1 as in T5."""

    kind = "sentencepiece"

    def __init__(self, path: str | pathlib.Path) -> None:
        try:
            import sentencepiece
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"--tokenizer {path}: reading a SentencePiece model needs `pip install sentencepiece`"
            ) from e
        self.path = str(path)
        if not pathlib.Path(self.path).is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {self.path}")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else PAD_ID
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else EOS_ID
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([i for i in ids if i not in (self.pad_id, self.eos_id)])

    def spec(self) -> dict:
        return {"kind": self.kind, "path": self.path}


class TransformersTokenizer:
    """A local transformers tokenizer folder (``AutoTokenizer``, local files only), encoding without special
    tokens (``pemoe.train`` adds start and end itself). Ids: its eos (required), its pad (else the eos), its bos
    (None if it has none) and ``vocab_size`` = ``len(tokenizer)`` (added tokens included)."""

    kind = "transformers"

    def __init__(self, path: str | pathlib.Path) -> None:
        from transformers import AutoTokenizer

        self.path = str(path)
        self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if self._tok.eos_token_id is None:
            raise ValueError(f"the tokenizer in {self.path} has no end-of-sequence token (eos_token)")
        self.eos_id = int(self._tok.eos_token_id)
        self.pad_id = int(self._tok.pad_token_id) if self._tok.pad_token_id is not None else self.eos_id
        self.bos_id = int(self._tok.bos_token_id) if self._tok.bos_token_id is not None else None
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def spec(self) -> dict:
        return {"kind": self.kind, "path": self.path}


Tokenizer = ByteTokenizer | SentencePieceTokenizer | TransformersTokenizer


def tokenizer_from_spec(spec: dict | None) -> Tokenizer:
    """Inverse of ``tokenizer.spec()``; None means the byte tokenizer."""
    if spec is None or spec.get("kind") == "bytes":
        return ByteTokenizer()
    if spec.get("kind") == "sentencepiece":
        return SentencePieceTokenizer(spec["path"])
    if spec.get("kind") == "transformers":
        return TransformersTokenizer(spec["path"])
    raise ValueError(f"unknown tokenizer spec {spec!r} (kinds: 'bytes', 'sentencepiece', 'transformers')")
