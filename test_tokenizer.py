"""
Tests for tokenizer.py: the toy tokenizers, and a Hugging Face folder read as the authors' tokenizer reads it.

    python -m pytest -q test_tokenizer.py
"""
import json
import os

import pytest

import shapes
import tokenizer
from neo import NEOConfig

TEXTS = ["hello world", "naïve café — déjà vu", "emoji 🤖🎉 ok", "中文字符和日本語のテキスト",
         "def f(x):\n    return x**2  # code\n\tindent", "  spaces   and\n\nnewlines  "]


def test_bytes_tokenizer():
    """The toy tokenizer has the contract's ids, round-trips any text, and keeps specials out of user text."""
    enc = tokenizer.get_tokenizer("bytes")
    assert enc.n_vocab == 262
    assert tokenizer.special_ids(enc) == dict(eot=256, im_start=257, im_end=258, img_start=259, img_end=260,
                                         img_context=261)
    for t in TEXTS:
        assert enc.decode(enc.encode(t)) == t and len(enc.encode(t)) == len(t.encode())
    assert enc.encode("<img>", allowed_special="all") == [259]
    assert len(enc.encode("<img>", disallowed_special=())) == 5


def test_shapes_tokenizer():
    """The toy default: the bytes tokenizer's specials, one token per ShapesWorld word (alone and after a space),
    still lossless on any text, and it fits the toy model's vocabulary."""
    enc = tokenizer.get_tokenizer("shapes")
    assert tokenizer.special_ids(enc) == tokenizer.special_ids(tokenizer.get_tokenizer("bytes"))
    for w in tokenizer.TOY_WORDS:
        assert len(enc.encode(w)) == 1 and len(enc.encode(" " + w)) == 1, w
    for t in TEXTS:
        assert enc.decode(enc.encode(t)) == t
    q = "What color is the circle?"
    assert len(enc.encode(q)) == 6 and len(tokenizer.get_tokenizer("bytes").encode(q)) == len(q)
    assert enc.n_vocab <= NEOConfig.preset("toy").vocab_size
    sample = shapes.ShapesWorld("midtrain", enc=enc)[0]  # every id a ShapesWorld sample uses is a real token
    assert max(sample["input_ids"]) < enc.n_vocab


def write_bpe_folder(path, layout="tokenizer.json", image_tokens=False, extra=()):
    """A tiny byte-level BPE in the Qwen layout: 256 byte tokens (ids in GPT-2 table order, as in Qwen), a few
    merges whose ids follow merge order, and added tokens after them. extra: more added tokens, as
    (content, special) pairs (Qwen3 lists <think> as not special, NEO adds <ref>, <box>, ...)."""
    b2u = tokenizer.bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(b2u.values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    added = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<IMG_CONTEXT>", "<img>", "</img>"] if image_tokens else [])
    special = {**{s: True for s in added}, **dict(extra)}
    added_ids = {s: len(vocab) + 10 + i for i, s in enumerate(special)}  # a gap, as in real checkpoints
    os.makedirs(path, exist_ok=True)
    if layout == "tokenizer.json":
        tj = {"model": {"type": "BPE", "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
              "added_tokens": [{"id": i, "content": s, "special": special[s]} for s, i in added_ids.items()]}
        json.dump(tj, open(os.path.join(path, "tokenizer.json"), "w"))
    else:
        json.dump(vocab, open(os.path.join(path, "vocab.json"), "w"))
        open(os.path.join(path, "merges.txt"), "w").write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges))
        decoder = {str(i): {"content": s, "special": special[s]} for s, i in added_ids.items()}
        json.dump({"added_tokens_decoder": decoder}, open(os.path.join(path, "tokenizer_config.json"), "w"))
    return vocab, added_ids


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab.json"])
def test_folder_tokenizer(tmp_path, layout):
    """A Qwen3-style folder: merges apply, text round-trips, specials are single ids only when allowed, and
    the missing image tokens are appended after the highest id."""
    vocab, added = write_bpe_folder(str(tmp_path / "qwen3"), layout)
    enc = tokenizer.get_tokenizer(str(tmp_path / "qwen3"))
    for t in TEXTS + [" the other word"]:
        assert enc.decode(enc.encode(t)) == t
    assert enc.encode(" the") == [vocab["Ġthe"]]  # the merges were used (ids = ranks)
    assert enc.encode(" word") == [vocab["Ġwor"], vocab["d"]]
    ids = tokenizer.special_ids(enc)
    assert ids["im_end"] == added["<|im_end|>"]
    top = max(added.values())
    assert (ids["img_context"], ids["img_start"], ids["img_end"]) == (top + 1, top + 2, top + 3)
    assert enc.encode("<|im_end|>", allowed_special="all") == [ids["im_end"]]
    assert ids["im_end"] not in enc.encode("<|im_end|>", disallowed_special=())
    with pytest.raises(ValueError):  # tiktoken's default: special text in ordinary input is an error
        enc.encode("<|im_end|>")


def test_neo_folder_keeps_its_image_ids(tmp_path):
    """A released-NEO-style folder already lists <img>, </img>, <IMG_CONTEXT>: their ids are kept."""
    _, added = write_bpe_folder(str(tmp_path / "neo"), image_tokens=True)
    ids = tokenizer.special_ids(tokenizer.get_tokenizer(str(tmp_path / "neo")))
    assert ids["img_start"] == added["<img>"] and ids["img_context"] == added["<IMG_CONTEXT>"]


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab.json"])
def test_folder_tokenizer_as_hugging_face(tmp_path, layout):
    """As the authors' Qwen2 tokenizer: user text is NFC-normalised; an added token typed in it (<ref>, <think>)
    is its one id, while typed chat and image markers stay plain text; the toy tokenizers keep text as it is."""
    _, added = write_bpe_folder(str(tmp_path / "neo"), layout, image_tokens=True,
                                extra=[("<ref>", True), ("<think>", False)])
    enc = tokenizer.get_tokenizer(str(tmp_path / "neo"))
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert tokenizer.encode_text(enc, decomposed) == tokenizer.encode_text(enc, composed) == enc.encode(composed)
    assert enc.encode(decomposed) != enc.encode(composed)  # so the normalisation did it
    toy = tokenizer.get_tokenizer("bytes")
    assert tokenizer.encode_text(toy, decomposed) == list(decomposed.encode())
    ids = tokenizer.encode_text(enc, "a<ref>b<think>c")
    assert ids == enc.encode("a") + [added["<ref>"]] + enc.encode("b") + [added["<think>"]] + enc.encode("c")
    for marker in ("<|im_end|>", "<img>", "<IMG_CONTEXT>"):
        assert tokenizer.encode_text(enc, marker) == enc.encode(marker, disallowed_special=())
    assert enc.hidden == {added[s] for s in added if s != "<think>"}  # special tokens, hidden from answers


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="'bytes'.*folder"):
        tokenizer.get_tokenizer("gpt2")
