"""
The tokenizer, text <-> token ids on tiktoken, offline: "shapes" (the toy's: bytes + one token per ShapesWorld
word, a BPE learnt here), "bytes", or a Qwen3 / released NEO folder (its tokenizer.json or vocab.json). Each has
the chat and image markers (SPECIALS) that data.py puts around turns and images.

    enc = get_tokenizer("shapes"); encode_text(enc, "What color is the circle?"), special_ids(enc)["img_context"]
    python -m pytest -q test_tokenizer.py
"""
import json
import os
import unicodedata
from functools import lru_cache

import tiktoken

SPECIALS = dict(eot="<|endoftext|>", im_start="<|im_start|>", im_end="<|im_end|>",
                img_start="<img>", img_end="</img>", img_context="<IMG_CONTEXT>")
# Qwen2/Qwen3's pre-tokenisation regex (their tokenizer.json): digits are split one by one
QWEN_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
            r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def get_tokenizer(name_or_path):
    """'shapes' (the toy: bytes + one token per ShapesWorld word, specials at ids 256..261), 'bytes' (256 byte
    ids + the same specials), or a folder with tokenizer.json / vocab.json (Qwen3, released NEO)."""
    if name_or_path in ("shapes", "bytes"):
        # tiktoken's named encodings download their files on first use; these are built in memory
        ranks = toy_ranks() if name_or_path == "shapes" else {bytes([i]): i for i in range(256)}
        return BPE(name_or_path, pat_str=QWEN_PAT, mergeable_ranks=ranks, hidden=range(256, 256 + len(SPECIALS)),
                   special_tokens={s: 256 + i for i, s in enumerate(SPECIALS.values())})
    if os.path.isdir(str(name_or_path)):
        return folder_tokenizer(str(name_or_path))
    raise ValueError(f"unknown tokenizer {name_or_path!r}: use 'shapes' or 'bytes' (the toy's) or a folder "
                     f"holding tokenizer.json or vocab.json (a Qwen3 or released NEO checkpoint)")


class BPE(tiktoken.Encoding):
    """A tiktoken.Encoding that also knows what a Hugging Face tokenizer folder adds to its vocabulary: NFC
    normalisation of input text (Qwen2's tokenizer does it, slow and fast) and the ids of special tokens, which
    decoded answers leave out (skip_special_tokens=True). Pickles with both."""

    def __init__(self, name, *, nfc=False, hidden=(), **kw):
        super().__init__(name, **kw)
        self.nfc, self.hidden = nfc, frozenset(hidden)

    def __getstate__(self):
        return {**super().__getstate__(), "nfc": self.nfc, "hidden": self.hidden}


def encode_text(enc, text):
    """Text -> ids as the authors' Hugging Face tokenizer gives them: NFC first (Qwen2's tokenizer normalises), and
    added tokens typed in the text (<ref>, <box>, <think>, ...) as their one id. The chat and image markers stay
    plain text: typed, they would end a turn early or break an image span."""
    if enc.nfc:
        text = unicodedata.normalize("NFC", text)
    return enc.encode(text, allowed_special=enc.special_tokens_set - set(SPECIALS.values()), disallowed_special=())


def special_ids(enc):
    """{eot, im_start, im_end, img_start, img_end, img_context} -> id in this tokenizer."""
    try:
        return {k: enc.encode_single_token(s) for k, s in SPECIALS.items()}
    except KeyError as e:
        raise ValueError(f"tokenizer {enc.name} lacks the special token {e}") from None


# -----------------------------------------------------------------------------
# The toy's vocabulary

# Every word ShapesWorld says, and the chat roles. The "shapes" tokenizer makes each one token (alone and after a
# space), so a toy question costs ~8 tokens instead of ~30 bytes: about 2.5x more samples per CPU-second.
TOY_WORDS = ("A Describe FPS How I In Is The There What Which a above and appear are assistant at below big bigger "
             "blue bottom box cat changed circle color cup does dog down first following frame frames from further goes green "
             "has hat higher image is left lower many map more move of one or pen position range red right sampled second see "
             "series shape shapes size small square sun system the there this time to top triangle up user video way "
             "which word written yellow").split()


@lru_cache(maxsize=None)
def toy_ranks():
    """Byte-level BPE trained here on TOY_WORDS (a few hundred merges, well under a second): bytes keep ids
    0..255, the 6 special tokens 256..261, merges 262.. in the order they were learnt (tiktoken's rank = id)."""
    words = sorted({p + w for w in TOY_WORDS for p in ("", " ")})
    seqs = [[bytes([b]) for b in w.encode()] for w in words]
    ranks = {bytes([i]): i for i in range(256)}
    nxt = 256 + len(SPECIALS)
    while True:
        pairs = {}
        for s in seqs:
            for p in zip(s, s[1:]):
                pairs[p] = pairs.get(p, 0) + 1
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent pair; ties broken by bytes: deterministic
        if a + b not in ranks:
            ranks[a + b], nxt = nxt, nxt + 1
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if s[i] == a and s[i + 1] == b:
                    s[i:i + 2] = [a + b]
                i += 1
    return ranks


# -----------------------------------------------------------------------------
# A Hugging Face tokenizer folder (Qwen3, released NEO)


def read_vocab(path):
    """-> (vocab {token: id}, added {content: (id, special)}) from a folder's tokenizer.json, or vocab.json with
    tokenizer_config.json / added_tokens.json (Qwen3, released NEO)."""
    def load(name):  # one of the folder's JSON files; None where it is missing
        if os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name), encoding="utf-8") as f:
                return json.load(f)

    if (t := load("tokenizer.json")) is not None:
        return t["model"]["vocab"], {a["content"]: (a["id"], a.get("special", True)) for a in t.get("added_tokens", [])}
    if (vocab := load("vocab.json")) is None:
        raise ValueError(f"{path}: no tokenizer.json or vocab.json; get_tokenizer accepts 'bytes' or such a folder")
    added = {c: (i, True) for c, i in (load("added_tokens.json") or {}).items()}
    added.update({v["content"]: (int(k), v.get("special", True))
                  for k, v in (load("tokenizer_config.json") or {}).get("added_tokens_decoder", {}).items()})
    return vocab, added


def bytes_to_unicode():
    """GPT-2's byte <-> printable unicode table: byte-level BPE vocabularies store tokens in this alphabet."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in bs]  # control bytes, space, ...: moved past 255, in order
    return dict(zip(bs + rest, map(chr, bs + [256 + n for n in range(len(rest))])))


def folder_tokenizer(path):
    """A byte-level BPE (Qwen3 / NEO) as a tiktoken.Encoding: BPE rank = token id, as in Qwen's own tiktoken
    origin. Every added token (special or not) becomes a tiktoken special token, which encode_text lets
    through as one id, except the chat and image markers (user text can never smuggle in <|im_end|> or <img>)."""
    vocab, added = read_vocab(path)
    dec = {c: b for b, c in bytes_to_unicode().items()}
    try:
        ranks = {bytes(dec[c] for c in tok): i for tok, i in vocab.items() if tok not in added}
    except KeyError as e:
        raise ValueError(f"{path}: not a byte-level BPE vocabulary (character {e} outside the GPT-2 byte table)")
    # A plain Qwen3 folder has no image tokens. Append them after the highest id in NEO's order: on Qwen3 this
    # gives <IMG_CONTEXT> 151669, <img> 151670, </img> 151671, the ids of the released NEO checkpoints.
    nxt = max(max(ranks.values()), max((i for i, _ in added.values()), default=-1)) + 1
    for s in ("<IMG_CONTEXT>", "<img>", "</img>"):
        if s not in added:
            added[s], nxt = (nxt, True), nxt + 1
    hidden = {i for i, special in added.values() if special} | {added[s][0] for s in SPECIALS.values() if s in added}
    return BPE(os.path.basename(os.path.normpath(path)), pat_str=QWEN_PAT, mergeable_ranks=ranks,
               special_tokens={c: i for c, (i, _) in added.items()}, nfc=True, hidden=hidden)


def tokenizer_of(folder):
    """The tokenizer a model folder names: the built-in one in its tokenizer.txt (train.py's folders), or the folder
    itself where it holds tokenizer.json or vocab.json; None where it has neither."""
    if os.path.isfile(os.path.join(folder, "tokenizer.txt")):
        return open(os.path.join(folder, "tokenizer.txt")).read().strip()
    return folder if any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json")) else None
