"""RWKV "World" tokenizer (`rwkv_vocab_v20230424.txt`): greedy longest match over UTF-8 bytes.

Same algorithm as the `rwkv` package's `TRIE_TOKENIZER` and PLIP-rs (spec §1.8): the text is
encoded to UTF-8, and at each byte position the longest vocabulary entry that matches is taken.
Offsets returned by `encode_with_offsets` are CHARACTER offsets into the input `str` (what HF fast
tokenizers return); a token that splits a multi-byte character gets that character's span.
"""

from __future__ import annotations

import ast
import os
from typing import Any, Iterable, Sequence

DEFAULT_VOCAB_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "rwkv_vocab_v20230424.txt")

_ID = -1  # key under which a trie node stores the id of the token ending there


def _parse_vocab(path: str) -> dict[int, bytes]:
    """Parses `idx repr nbytes` lines; `repr` is a Python bytes/str literal (str -> UTF-8)."""
    idx2bytes: dict[int, bytes] = {}
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                first = line.index(" ")
                last = line.rindex(" ")
                idx = int(line[:first])
                nbytes = int(line[last + 1:])
                value = ast.literal_eval(line[first + 1:last])
            except (ValueError, SyntaxError) as e:
                raise ValueError(f"{path}:{lineno}: cannot parse vocabulary line {line!r}: {e}") from e
            if isinstance(value, str):
                value = value.encode("utf-8")
            if not isinstance(value, bytes):
                raise ValueError(f"{path}:{lineno}: token literal is not bytes or str: {line!r}")
            if len(value) != nbytes:
                raise ValueError(
                    f"{path}:{lineno}: token {idx} has {len(value)} bytes but the line says {nbytes}")
            if idx in idx2bytes:
                raise ValueError(f"{path}:{lineno}: duplicate token id {idx}")
            idx2bytes[idx] = value
    if not idx2bytes:
        raise ValueError(f"{path}: empty vocabulary file")
    return idx2bytes


class RwkvWorldTokenizer:
    """RWKV World tokenizer. `eos_token_id` = 0 (decodes to ""); no special tokens are ever added."""

    eos_token_id: int = 0

    def __init__(self, vocab_path: str | None = None):
        self.vocab_path = vocab_path or DEFAULT_VOCAB_PATH
        self.idx2bytes: dict[int, bytes] = _parse_vocab(self.vocab_path)
        self.bytes2idx: dict[bytes, int] = {}
        for idx, b in self.idx2bytes.items():
            self.bytes2idx[b] = idx  # like TRIE_TOKENIZER: a later id wins on duplicate bytes
        self._root: dict[int, Any] = {}
        for b, idx in self.bytes2idx.items():
            node = self._root
            for byte in b:
                node = node.setdefault(byte, {})
            node[_ID] = idx
        self.max_token_bytes = max(len(b) for b in self.idx2bytes.values())

    @property
    def vocab_size(self) -> int:
        """Largest token id + 1 (65530 for the World vocabulary; the model's embedding has 65536 rows)."""
        return max(self.idx2bytes) + 1

    def __len__(self) -> int:
        return self.vocab_size

    # ----------------------------------------------------------------------------------- encoding
    def encode_bytes_with_spans(self, data: bytes) -> tuple[list[int], list[tuple[int, int]]]:
        """Greedy longest match. Returns ids and (start, end) BYTE spans."""
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        n = len(data)
        i = 0
        root = self._root
        while i < n:
            node = root
            j = i
            best_id = -1
            best_end = -1
            while j < n:
                node = node.get(data[j])
                if node is None:
                    break
                j += 1
                tid = node.get(_ID)
                if tid is not None:
                    best_id, best_end = tid, j
            if best_id < 0:
                raise ValueError(f"no RWKV vocabulary entry matches the bytes at offset {i}: {data[i:i + 8]!r}")
            ids.append(best_id)
            spans.append((i, best_end))
            i = best_end
        return ids, spans

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens)."""
        return self.encode_bytes_with_spans(text.encode("utf-8"))[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and (start, end) CHARACTER offsets into `text` (end exclusive)."""
        data = text.encode("utf-8")
        ids, spans = self.encode_bytes_with_spans(data)
        if len(data) == len(text):  # ASCII: byte offsets are char offsets
            return ids, spans
        byte2char = [0] * (len(data) + 1)
        pos = 0
        for ci, ch in enumerate(text):
            nb = len(ch.encode("utf-8"))
            for k in range(nb):
                byte2char[pos + k] = ci
            pos += nb
        byte2char[len(data)] = len(text)
        offsets = [(byte2char[s], byte2char[e - 1] + 1) for s, e in spans]
        return ids, offsets

    def __call__(self, text: str, add_special_tokens: bool = False,
                 return_offsets_mapping: bool = True, **unused: Any) -> dict[str, list]:
        """HF-fast-tokenizer-like call: {"input_ids", "attention_mask"[, "offset_mapping"]}.

        `add_special_tokens` is accepted and ignored (RWKV adds none).
        """
        del add_special_tokens, unused
        ids, offsets = self.encode_with_offsets(text)
        out: dict[str, list] = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out

    # ----------------------------------------------------------------------------------- decoding
    def _token_bytes(self, idx: int) -> bytes:
        idx = int(idx)
        if idx == self.eos_token_id:
            return b""
        b = self.idx2bytes.get(idx)
        if b is None:
            raise ValueError(f"token id {idx} is not in the RWKV World vocabulary ({self.vocab_path})")
        return b

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated token bytes (id 0 = eos gives b"")."""
        return b"".join(self._token_bytes(i) for i in ids)

    def decode(self, ids: Iterable[int], errors: str = "strict", skip_special_tokens: bool = False) -> str:
        """UTF-8 decode of the concatenated bytes. `errors` as in `bytes.decode` ("strict" raises)."""
        del skip_special_tokens
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """Token strings (UTF-8 decoded with "backslashreplace" for partial characters)."""
        if isinstance(ids, int):
            return self._token_bytes(ids).decode("utf-8", errors="backslashreplace")
        return [self._token_bytes(i).decode("utf-8", errors="backslashreplace") for i in ids]
