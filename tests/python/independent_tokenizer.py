"""Tokenizers built independently of llama.cpp, to check the token counts Tidepool bills.

SmolLM2 is a GPT-2-style byte-level BPE: we rebuild it with Hugging Face `tokenizers` from the
vocabulary and merges stored in the GGUF file itself (read with the `gguf` package), so the count
does not come from the code under test. MiniLM's WordPiece tokenizer ships as tokenizer.json."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# The "smollm" pre-tokenizer of llama.cpp is GPT-2's split regex with digits split one by one.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@lru_cache(maxsize=4)
def gguf_bpe(path: str) -> Tokenizer:
    reader = GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    token_types = reader.fields["tokenizer.ggml.token_type"].contents()
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_GPT2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3) such as <|im_start|> are parsed as single tokens in prompts.
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(token_types) if t == 3]
    tok.add_special_tokens(special)
    return tok


def count_gguf(path: Path, text: str) -> int:
    return len(gguf_bpe(str(path)).encode(text, add_special_tokens=False).ids)


@lru_cache(maxsize=2)
def wordpiece(path: str) -> Tokenizer:
    tok = Tokenizer.from_file(path)
    tok.no_padding()
    tok.no_truncation()
    return tok


def count_wordpiece(tokenizer_json: Path, text: str) -> int:
    return len(wordpiece(str(tokenizer_json)).encode(text).ids)
