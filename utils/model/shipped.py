"""Tokenizers and model configs shipped inside the repository (no hub downloads).

Everything here lives under ``utils/model/model_configs/``:

* ``tokenizer/vocab.json`` + ``tokenizer/merges.txt`` -- OpenAI's CLIP BPE vocabulary
  (49408 tokens), converted offline by ``scripts/make_clip_tokenizer.py``.  SD 1.x
  (CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H/14) share it; they differ only in the pad
  token (see :func:`load_tokenizer`).
* ``sd15/``, ``sd2-base/``, ``sd2-v/`` -- diffusers config folders (``model_index.json``,
  ``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``; configs only, no weights) as the
  public repos stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-base
  and stabilityai/stable-diffusion-2-1 have them, with safety checker / feature extractor
  left out.

Example::

    from utils.model.shipped import load_tokenizer, config_dir, save_tokenizer_files
    tok = load_tokenizer("sd1")
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir("sd15") / "unet"))
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"
TOKENIZER_DIR = MODEL_CONFIGS / "tokenizer"

# kind -> pad token.  "sd1": openai/clip-vit-large-patch14 pads with <|endoftext|> (id 49407).
# "sd2": stabilityai/stable-diffusion-2* ship the same vocab with pad_token "!" (id 0),
# matching OpenCLIP, which pads with zeros.
_TOKENIZER_PAD = {"sd1": "<|endoftext|>", "sd2": "!"}

# kind -> (folder, what it is)
CONFIG_KINDS = {
    "sd15": "Stable Diffusion 1.5, 512 px, epsilon prediction, CLIP ViT-L/14 text encoder",
    "sd2-base": "Stable Diffusion 2 base, 512 px, epsilon prediction, OpenCLIP ViT-H/14 text encoder",
    "sd2-v": "Stable Diffusion 2.1 (768-v), 768 px, v_prediction, OpenCLIP ViT-H/14 text encoder",
}


def load_tokenizer(kind: str = "sd1"):
    """Return a ``transformers.CLIPTokenizer`` built from the shipped vocab/merges.

    kind: ``"sd1"`` (pad ``<|endoftext|>``) or ``"sd2"`` (pad ``"!"``); both have
    ``model_max_length`` 77, bos ``<|startoftext|>`` (49406), eos ``<|endoftext|>`` (49407).
    """
    if kind not in _TOKENIZER_PAD:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(_TOKENIZER_PAD)}")
    from transformers import CLIPTokenizer

    # Note: transformers 5 ignores the keywords ``vocab_file=``/``merges_file=`` in
    # CLIPTokenizer(...) (it silently builds a 3-token vocab); loading the folder works
    # on transformers 4.x and 5.x alike.
    # (A local folder never touches the hub; local_files_only is not passed because
    # transformers 5 would write it into a saved tokenizer_config.json.)
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=_TOKENIZER_PAD[kind], model_max_length=77)


def save_tokenizer_files(out_dir: str | Path, kind: str = "sd1") -> Path:
    """Write a portable tokenizer folder (vocab.json, merges.txt, tokenizer_config.json).

    Use instead of ``tokenizer.save_pretrained``: transformers 5 saves only a 3.5 MB
    ``tokenizer.json``, which transformers 4's (slow) ``CLIPTokenizer`` cannot load; this
    layout (the one the SD hub repos use) loads with both.
    """
    if kind not in _TOKENIZER_PAD:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(_TOKENIZER_PAD)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "special_tokens_map.json"):  # stale files from save_pretrained
        (out / name).unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_DIR / name, out / name)
    cfg = {
        "add_prefix_space": False,
        "bos_token": "<|startoftext|>",
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": _TOKENIZER_PAD[kind],
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def config_dir(kind: str) -> Path:
    """Path of a shipped diffusers config folder: ``"sd15"``, ``"sd2-base"`` or ``"sd2-v"``."""
    if kind not in CONFIG_KINDS:
        raise ValueError(f"unknown config kind {kind!r}; expected one of {sorted(CONFIG_KINDS)}")
    return MODEL_CONFIGS / kind
