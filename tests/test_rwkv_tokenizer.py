"""RWKV World tokenizer: parity with the `rwkv` package's TRIE_TOKENIZER, offsets, decode."""

from __future__ import annotations

from pathlib import Path
import json
import os

import numpy as np
import pytest

from plip_jax.models.rwkv_tokenizer import DEFAULT_VOCAB_PATH, RwkvWorldTokenizer

REFERENCE_JSON = str(Path(__file__).resolve().parent / "data" / "reference" / "rwkv6_reference.json")

STRINGS = [
    "def fibonacci(n):\n    ",
    "def add(a, b):\n    return a + b",
    "fn main() {\n    println!(\"Hello, world!\");\n}\n",
    "#[test]\nfn test_add() {\n    assert_eq!(add(2, 3), 5);\n}",
    '    """\n    >>> add(2, 3)\n    5\n    """\n',
    "\t\tx = {'a': [1, 2.5e-3, None]}\r\n",
    "",
    " ",
    "                                                                                          x",
    "héllo wörld, naïve café — “quotes” … ½ ∑ π ≤ ∞",
    "日本語のテキストと中文字符，한국어 텍스트",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी",
    "\x00\x01\x7f control \u200b zero-width \ufeff bom",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟘𝟙𝟚 and surrogates-free astral 🀄",
    "impl<T: Clone> Foo<T> { fn bar(&self) -> Option<&T> { self.0.first() } }",
    "SELECT * FROM t WHERE x >= 10 AND y <> 'z'; -- comment",
]


@pytest.fixture(scope="module")
def tok():
    return RwkvWorldTokenizer()


@pytest.fixture(scope="module")
def ref_tok():
    from rwkv import rwkv_tokenizer  # a declared test dependency ([test] extra): missing is a failure, not a skip

    return rwkv_tokenizer.TRIE_TOKENIZER(DEFAULT_VOCAB_PATH)


def _random_strings(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pools = [list("abcdefghijklmnopqrstuvwxyz ABCXYZ_0123456789()[]{}:;.,=+-*/\\\"'\n\t#<>!&|"),
             list("äöüßéèçñ日本語中文한국어ёжщ€£¥•“”…—") + ["😀", "🎉", "👍🏽", "\u200d", "🇫", "🇷"]]
    out = []
    for i in range(n):
        pool = pools[0] + (pools[1] if i % 2 else [])
        k = int(rng.integers(1, 60))
        out.append("".join(pool[j] for j in rng.integers(0, len(pool), k)))
    return out


def test_vocab_file_and_size(tok):
    assert os.path.exists(DEFAULT_VOCAB_PATH)
    assert tok.vocab_size == 65530 and len(tok.idx2bytes) == 65529
    assert tok.eos_token_id == 0
    assert tok.max_token_bytes == 128


def test_reference_ids(tok):
    ids = tok.encode("def fibonacci(n):\n    ")
    assert ids == [7334, 21676, 41943, 41, 111, 501, 28352]
    assert tok.convert_ids_to_tokens(ids) == ["def", " fib", "onacci", "(", "n", "):", "\n    "]
    ref = json.load(open(REFERENCE_JSON))
    assert tok.encode(ref["test_prompt"]) == ref["token_ids"]
    assert tok.decode(ref["generated_token_ids"]) == ref["generated_text"]
    for p in ref["top_predictions"]:
        assert tok.decode([p["token_id"]]) == p["token"]


@pytest.mark.parity
def test_parity_with_rwkv_package(tok, ref_tok):
    for s in STRINGS + _random_strings(300):
        assert tok.encode(s) == ref_tok.encode(s), repr(s)


def test_round_trip_and_offsets(tok):
    for s in STRINGS + _random_strings(200, seed=1):
        ids, offsets = tok.encode_with_offsets(s)
        assert tok.decode(ids) == s
        assert len(ids) == len(offsets)
        # offsets are char spans that cover the text in order; consecutive tokens of one char share it
        prev_start, prev_end = 0, 0
        for (a, b), tid in zip(offsets, ids):
            assert 0 <= a < b <= len(s)
            assert a == prev_end or (a, b) == (prev_start, prev_end)
            prev_start, prev_end = a, b
            tb = tok.idx2bytes[tid]
            assert tb in s[a:b].encode("utf-8")
        assert prev_end == len(s)


def test_ascii_offsets_are_byte_offsets(tok):
    s = "def add(a, b):\n    return a + b"
    ids, offsets = tok.encode_with_offsets(s)
    assert "".join(s[a:b] for a, b in offsets) == s
    assert [s[a:b] for a, b in offsets] == tok.convert_ids_to_tokens(ids)


def test_split_multibyte_char_gets_char_span(tok):
    ids, offsets = tok.encode_with_offsets("a😀b")
    assert ids == [98, 3319, 153, 129, 99]  # the emoji is split into 3 byte-level tokens
    assert offsets == [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)]
    ids, offsets = tok.encode_with_offsets("🇫🇷é")
    assert offsets == [(0, 1)] * 3 + [(1, 2)] * 3 + [(2, 3)]


def test_hf_style_call(tok):
    s = "fn x() {}\n"
    enc = tok(s, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == tok.encode(s)
    assert enc["offset_mapping"] == tok.encode_with_offsets(s)[1]
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    assert "offset_mapping" not in tok(s, return_offsets_mapping=False)


def test_decode_errors(tok):
    emoji_ids = tok.encode("😀")
    partial = None
    for tid in range(1, 257):  # single raw bytes 0x80.. are invalid UTF-8 on their own
        if tok.idx2bytes.get(tid) == b"\xf0":
            partial = tid
    assert partial is not None
    with pytest.raises(UnicodeDecodeError):
        tok.decode([partial])
    assert tok.decode([partial], errors="replace") == "\ufffd"
    assert tok.decode(emoji_ids + [0]) == "😀"  # eos decodes to ""
    with pytest.raises(ValueError, match="not in the RWKV World vocabulary"):
        tok.decode([65535])


def test_bad_vocab_file(tmp_path):
    p = tmp_path / "v.txt"
    p.write_text("1 'ab' 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has 2 bytes but the line says 3"):
        RwkvWorldTokenizer(str(p))
    p.write_text("1 'ab 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot parse"):
        RwkvWorldTokenizer(str(p))
    p.write_text("1 'a' 1\n2 b'\\xe2\\x82' 2\n", encoding="utf-8")
    t = RwkvWorldTokenizer(str(p))
    with pytest.raises(ValueError, match="no RWKV vocabulary entry"):
        t.encode("ab")
