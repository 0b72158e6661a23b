"""A word-level vocabulary for the real ``CLIPTokenizer``.

CLIP's tokenizer is byte-pair encoding over byte characters. We write a vocabulary holding
every byte character (so any text still tokenizes) plus one token per word of the world, and
merges that join each word's characters into that single token.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16


def _chain(word: str) -> list[tuple[str, str]]:
    """The merges that join ``word`` into one token, right to left.

    Every merge's right side ends in ``</w>``, so it can only apply at the end of a word and
    only ever grows a suffix of the word being tokenized: no word's merges break another's.
    """
    merges, right = [], word[-1] + "</w>"
    for left in reversed(word[:-1]):
        merges.append((left, right))
        right = left + right
    return merges


def write_tokenizer(words: list[str], folder: Path, *, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """Write vocab.json, merges.txt and the tokenizer config for ``words`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    for word in words:
        for pair in _chain(word):
            if pair not in merges:
                merges.append(pair)
        if len(word) > 1:
            tokens.append(word + "</w>")
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length, pad_token=EOS
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def check_word_level(tokenizer: CLIPTokenizer, words: list[str]) -> list[str]:
    """The words that do not come out as exactly one token (empty when the vocabulary is right)."""
    return [w for w in words if len(tokenizer.tokenize(w)) != 1]
