"""The CLIP BPE tokenizer, built offline from the vocabulary that open_clip ships.

Stable Diffusion 1.x / 2.x tokenize prompts with OpenAI CLIP's byte-level BPE (49,408 tokens:
256 byte symbols, their 256 end-of-word variants, 48,894 merges, then `<|startoftext|>` = 49406 and
`<|endoftext|>` = 49407). The open_clip package carries that BPE as `bpe_simple_vocab_16e6.txt.gz`,
so a transformers `CLIPTokenizer` can be written out from it without touching the network: we
rebuild the vocabulary exactly as open_clip's `SimpleTokenizer.__init__` does, write `vocab.json`
and `merges.txt` into a temporary folder and load that folder with transformers.

Departures from open_clip's own tokenizer (ids of the text are identical; tests check it):
- padding uses `<|endoftext|>` (49407), as in SD 1.x's tokenizer folder; open_clip pads with 0.
  (SD 2.x's tokenizer folder pads with "!" = 0, but then "!" is a special token and "!!" in a
  prompt no longer tokenizes as open_clip does; load SD 2.x's own tokenizer folder instead.)
- normalisation is transformers' (NFC, collapse whitespace, lowercase); open_clip also runs ftfy
  and unescapes HTML entities, so text with mojibake or `&amp;` can differ.
"""

import gzip
import json
import tempfile
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

from safediff.errors import SafediffError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
# open_clip keeps the first 49152 - 256 - 2 merges (after the header line) so that
# 256 bytes + 256 end-of-word bytes + merges + 2 special tokens = 49408 ids.
_NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others are shifted to code points 256 and up, in
    byte order. The order of the returned dict is the order of the first 256 vocabulary ids.
    """
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _open_clip_bpe_path() -> Path:
    try:
        path = Path(str(resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"))
    except ModuleNotFoundError:
        raise SafediffError(
            "the CLIP tokenizer is built from open_clip's BPE file; install it with "
            "`pip install open_clip_torch`"
        ) from None
    if not path.is_file():
        raise SafediffError(f"open_clip's BPE file is missing: {path}; reinstall open_clip_torch")
    return path


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's BPE vocabulary (token -> id, 49408 entries) and merges ("a b" lines, rank order)."""
    with gzip.open(_open_clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is a header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise SafediffError(
            f"open_clip's BPE file gave {len(vocab)} tokens, expected {VOCAB_SIZE}; "
            "reinstall open_clip_torch"
        )
    return vocab, merges


def build_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A transformers `CLIPTokenizer` with OpenAI CLIP's vocabulary, built without the network.

    max_length: `model_max_length` (77 for every SD 1.x / 2.x text encoder).
    The tokenizer adds `<|startoftext|>` and `<|endoftext|>` around every text; ids equal open_clip's.
    """
    vocab, merges = clip_vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="safediff-clip-tok-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
        )
        tokenizer = CLIPTokenizer.from_pretrained(
            folder, model_max_length=max_length, pad_token=EOS_TOKEN, local_files_only=True
        )
    return tokenizer
