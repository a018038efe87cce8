#!/usr/bin/env python
"""Build the Hugging Face CLIP tokenizer files (vocab.json + merges.txt) offline.

Provenance
----------
Stable Diffusion 1.x uses OpenAI's CLIP ViT-L/14 tokenizer; Stable Diffusion 2.x
uses OpenCLIP ViT-H/14, whose tokenizer has the *same* BPE vocabulary and merges
(only the pad token differs, see ``utils/model/shipped.py``).  Both derive from OpenAI's
byte-pair-encoding file ``bpe_simple_vocab_16e6.txt.gz`` published in
https://github.com/openai/CLIP (``clip/bpe_simple_vocab_16e6.txt.gz``, MIT license)
and also shipped inside the PyPI wheel ``open_clip_torch``
(``open_clip/bpe_simple_vocab_16e6.txt.gz``), which is where we take it from so
nothing needs to be downloaded from the Hugging Face hub::

    pip download --no-deps open_clip_torch -d /tmp/oc
    cd /tmp/oc && unzip -o open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz'
    python scripts/make_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz \
        utils/model/model_configs/tokenizer

The conversion mirrors ``SimpleTokenizer.__init__`` of openai/CLIP
(``clip/simple_tokenizer.py``), which is also how the files in
``openai/clip-vit-large-patch14`` on the hub were produced:

* merges = lines[1 : 49152 - 256 - 2 + 1] of the decompressed file (48894 merges;
  line 0 is a version header);
* vocab  = the 256 byte-level unicode symbols (``bytes_to_unicode`` order), the
  same 256 symbols + ``</w>``, the concatenation of each merge pair, then
  ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49408 entries;
* merges.txt = ``#version: 0.2`` header line + the merge lines.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # 48894, as in openai/CLIP simple_tokenizer.py
VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable unicode map of GPT-2 / CLIP (same order as openai/CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build(bpe_gz_path: str | Path) -> tuple[dict[str, int], list[str]]:
    """Return (vocab token->id, merge lines) from OpenAI's bpe_simple_vocab_16e6.txt.gz."""
    lines = gzip.open(bpe_gz_path, "rt", encoding="utf-8").read().split("\n")
    merge_lines = lines[1 : N_MERGES + 1]
    assert len(merge_lines) == N_MERGES, len(merge_lines)
    merges = [tuple(m.split()) for m in merge_lines]
    assert all(len(m) == 2 for m in merges)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == VOCAB_SIZE, (len(vocab), len(tokens))
    return vocab, merge_lines


def write(vocab: dict[str, int], merge_lines: list[str], out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Compact JSON in id order, unicode kept (as on the hub).
    with open(out / "vocab.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(vocab, ensure_ascii=False) + "\n")
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for line in merge_lines:
            f.write(line + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bpe_gz", help="path to bpe_simple_vocab_16e6.txt.gz (e.g. from the open_clip_torch wheel)")
    p.add_argument("out_dir", nargs="?", default=str(Path(__file__).resolve().parents[1] / "utils/model/model_configs/tokenizer"))
    a = p.parse_args()
    vocab, merges = build(a.bpe_gz)
    write(vocab, merges, a.out_dir)
    print(f"wrote {a.out_dir}/vocab.json ({len(vocab)} tokens) and merges.txt ({len(merges)} merges)")


if __name__ == "__main__":
    main()
