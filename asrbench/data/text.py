"""Transcript normalisation and the character vocabulary shared by every corpus.

LibriSpeech transcripts are upper-case letters, apostrophes and single spaces; every corpus
that asrbench reads or writes is normalised to that alphabet so one vocabulary serves all.
"""
from __future__ import annotations

import re

BLANK = "<b>"
SPACE = " "
ALPHABET = [BLANK, SPACE, "'"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
_INDEX = {ch: i for i, ch in enumerate(ALPHABET)}
_DROP = re.compile(r"[^A-Z' ]+")
_SPACES = re.compile(r" +")


def normalize(text: str) -> str:
    """Upper-case, map anything outside A-Z and the apostrophe to a space, squeeze spaces."""
    text = _DROP.sub(" ", text.upper().replace("-", " "))
    return _SPACES.sub(" ", text).strip()


def encode(text: str) -> list[int]:
    """Character ids of a normalised transcript (no blank)."""
    return [_INDEX[ch] for ch in text]


def decode(ids: list[int]) -> str:
    """Inverse of :func:`encode` for ids without the blank."""
    return "".join(ALPHABET[i] for i in ids)


def vocab_size() -> int:
    return len(ALPHABET)
