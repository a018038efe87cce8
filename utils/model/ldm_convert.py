"""Convert Stable Diffusion 1.x/2.x weights from diffusers layout to the original LDM (CompVis) layout.

diffusers only ships the LDM -> diffusers direction
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``).
This module is the exact inverse of those functions, so that a file written with
``pipeline_to_ldm`` + ``safetensors.torch.save_file`` loads in A1111 / ComfyUI and round-trips
through ``StableDiffusionPipeline.from_single_file``.

Nothing here is hard-coded to SD1.5's shape: the key mapping is derived from the model config
(number of blocks, ``layers_per_block``, which blocks carry attention, ...). Inside a block the
diffusers and LDM names mostly agree (e.g. the whole ``Transformer2DModel`` subtree keeps its
names), so the mapping is a list of *module prefix* rules::

    down_blocks.0.resnets.1.   ->  input_blocks.2.0.   (plus resnet-internal renames)

Every key of the given state dict must be matched by exactly one rule; anything left over
(LoRA layers, an unsupported embedding type, a ``torch.compile`` wrapper prefix, ...) raises
instead of being silently dropped from the checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1: HF CLIPTextModel stored as-is
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD2: open_clip text tower

# Buffers that carry no learned state and that loaders do not need.
_DROPPED_TEXT_KEYS = {"embeddings.position_ids"}


class _Rule(NamedTuple):
    """Map every diffusers key starting with ``src`` to ``dst`` + rest of the key.

    ``renames`` rewrites the start of the rest of the key (module names that differ inside a block,
    e.g. a resnet's ``norm1.`` is LDM's ``in_layers.0.``). ``transform`` is applied to the tensor.
    """

    src: str
    dst: str
    renames: Mapping[str, str] = {}
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None


# Inverse of single_file_utils.update_unet_resnet_ldm_to_diffusers.
_UNET_RESNET_RENAMES = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}

# Inverse of single_file_utils.update_vae_resnet_ldm_to_diffusers.
_VAE_RESNET_RENAMES = {"conv_shortcut.": "nin_shortcut."}

# Inverse of single_file_utils.update_vae_attentions_ldm_to_diffusers.
_VAE_ATTENTION_RENAMES = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    """Read a field from a diffusers FrozenDict / plain dict / transformers PretrainedConfig."""
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _apply_rules(state_dict: Mapping[str, torch.Tensor], rules: list[_Rule], prefix: str, what: str) -> dict:
    """Rename every key of ``state_dict`` by the rule with the longest matching ``src``."""
    # Longest prefix first: "class_embedding." (num_class_embeds) must not catch "class_embedding.linear_1.".
    rules = sorted(rules, key=lambda r: len(r.src), reverse=True)
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        rule = next((r for r in rules if key.startswith(r.src)), None)
        if rule is None:
            unmapped.append(key)
            continue
        rest = key[len(rule.src) :]
        for old, new in rule.renames.items():
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
        new_key = prefix + rule.dst + rest
        if new_key in out:
            raise ValueError(f"{what}: two keys map to {new_key!r}")
        out[new_key] = rule.transform(rest, tensor) if rule.transform else tensor
    if unmapped:
        raise KeyError(f"{what}: no LDM name for {len(unmapped)} key(s), e.g. {unmapped[:5]}")
    return out


# --------------------------------------------------------------------------------------------- UNet


def _layers_per_block(config: Any) -> int:
    lpb = _cfg(config, "layers_per_block")
    if isinstance(lpb, (list, tuple)):
        # diffusers' convert_ldm_unet_checkpoint numbers input/output blocks with a single
        # layers_per_block, so a per-block value cannot be read back; refuse rather than mislabel.
        if len(set(lpb)) != 1:
            raise NotImplementedError(f"per-block layers_per_block {lpb} has no LDM equivalent")
        lpb = lpb[0]
    return int(lpb)


def _unet_rules(config: Any) -> list[_Rule]:
    """Module-prefix rules for UNet2DConditionModel, the inverse of convert_ldm_unet_checkpoint."""
    lpb = _layers_per_block(config)
    down_types = list(_cfg(config, "down_block_types"))
    up_types = list(_cfg(config, "up_block_types"))

    rules = [
        _Rule("time_embedding.linear_1.", "time_embed.0."),
        _Rule("time_embedding.linear_2.", "time_embed.2."),
        _Rule("conv_in.", "input_blocks.0.0."),
        _Rule("conv_norm_out.", "out.0."),
        _Rule("conv_out.", "out.2."),
    ]

    # Optional embeddings that convert_ldm_unet_checkpoint knows about (DIFFUSERS_TO_LDM_MAPPING).
    # SD1/SD2 have none of them; anything else present in the state dict is reported as unmapped.
    if _cfg(config, "class_embed_type") in ("timestep", "projection"):
        rules += [
            _Rule("class_embedding.linear_1.", "label_emb.0.0."),
            _Rule("class_embedding.linear_2.", "label_emb.0.2."),
        ]
    if _cfg(config, "addition_embed_type") == "text_time":
        rules += [
            _Rule("add_embedding.linear_1.", "label_emb.0.0."),
            _Rule("add_embedding.linear_2.", "label_emb.0.2."),
        ]
    if _cfg(config, "num_class_embeds") is not None:
        rules.append(_Rule("class_embedding.", "label_emb."))

    # input_blocks: 0 is conv_in; then every down block owns (lpb + 1) consecutive ids: lpb
    # resnet(+attention) entries followed by its downsampler op. The final down block has no
    # downsampler, which leaves its last id unused - exactly the numbering that
    # convert_ldm_unet_checkpoint decodes with (i - 1) // (lpb + 1) and (i - 1) % (lpb + 1).
    for b, block_type in enumerate(down_types):
        first = 1 + b * (lpb + 1)
        has_attention = "CrossAttn" in block_type
        for layer in range(lpb):
            ldm = f"input_blocks.{first + layer}"
            rules.append(_Rule(f"down_blocks.{b}.resnets.{layer}.", f"{ldm}.0.", _UNET_RESNET_RENAMES))
            if has_attention:
                rules.append(_Rule(f"down_blocks.{b}.attentions.{layer}.", f"{ldm}.1."))
        if b < len(down_types) - 1:  # UNet2DConditionModel: add_downsample = not is_final_block
            rules.append(_Rule(f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{first + lpb}.0.op."))

    # middle_block: resnet, attention, resnet. The forward converter maps even ids to resnets and
    # odd ids to attentions, so only the cross-attention mid block can be represented.
    mid_type = _cfg(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type == "UNetMidBlock2DCrossAttn":
        rules += [
            _Rule("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET_RENAMES),
            _Rule("mid_block.attentions.0.", "middle_block.1."),
            _Rule("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET_RENAMES),
        ]
    elif mid_type is not None:
        raise NotImplementedError(f"mid_block_type {mid_type!r} has no LDM mapping in diffusers")

    # output_blocks: every up block owns (lpb + 1) ids, each resnet(+attention); the upsampler sits
    # inside the block's last entry, after the attention when there is one (.2.conv) or directly
    # after the resnet (.1.conv).
    for b, block_type in enumerate(up_types):
        first = b * (lpb + 1)
        has_attention = "CrossAttn" in block_type
        for layer in range(lpb + 1):
            ldm = f"output_blocks.{first + layer}"
            rules.append(_Rule(f"up_blocks.{b}.resnets.{layer}.", f"{ldm}.0.", _UNET_RESNET_RENAMES))
            if has_attention:
                rules.append(_Rule(f"up_blocks.{b}.attentions.{layer}.", f"{ldm}.1."))
        if b < len(up_types) - 1:  # UNet2DConditionModel: add_upsample = not is_final_block
            slot = 2 if has_attention else 1
            rules.append(_Rule(f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{first + lpb}.{slot}.conv."))
    return rules


def unet_to_ldm(unet_state_dict: Mapping[str, torch.Tensor], unet_config: Any) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> ``model.diffusion_model.*`` keys.

    Tensors are passed through unchanged (LDM stores the same shapes, including SD2's linear
    proj_in/proj_out), so this works on meta tensors too.
    """
    return _apply_rules(unet_state_dict, _unet_rules(unet_config), UNET_PREFIX, "unet")


# ---------------------------------------------------------------------------------------------- VAE


def _linear_to_conv1x1(rest: str, tensor: torch.Tensor) -> torch.Tensor:
    # LDM's VAE AttnBlock uses 1x1 Conv2d for q/k/v/proj_out; diffusers uses Linear.
    if rest.endswith("weight") and not rest.startswith("norm.") and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


def _vae_rules(config: Any) -> list[_Rule]:
    """Module-prefix rules for AutoencoderKL, the inverse of convert_ldm_vae_checkpoint."""
    lpb = int(_cfg(config, "layers_per_block"))
    n_down = len(_cfg(config, "down_block_types"))
    n_up = len(_cfg(config, "up_block_types"))

    rules = [_Rule("quant_conv.", "quant_conv."), _Rule("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        rules += [
            _Rule(f"{part}.conv_in.", f"{part}.conv_in."),
            _Rule(f"{part}.conv_norm_out.", f"{part}.norm_out."),
            _Rule(f"{part}.conv_out.", f"{part}.conv_out."),
            _Rule(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET_RENAMES),
            _Rule(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET_RENAMES),
            _Rule(
                f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION_RENAMES, _linear_to_conv1x1
            ),
        ]

    for i in range(n_down):
        for j in range(lpb):
            rules.append(
                _Rule(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET_RENAMES)
            )
        if i < n_down - 1:  # Encoder: add_downsample = not is_final_block
            rules.append(_Rule(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."))

    # LDM's decoder counts its up blocks from the lowest resolution, diffusers from the highest.
    for i in range(n_up):
        ldm_i = n_up - 1 - i
        for j in range(lpb + 1):
            rules.append(
                _Rule(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{ldm_i}.block.{j}.", _VAE_RESNET_RENAMES)
            )
        if i < n_up - 1:  # Decoder: add_upsample = not is_final_block
            rules.append(_Rule(f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{ldm_i}.upsample.conv."))
    return rules


def vae_to_ldm(vae_state_dict: Mapping[str, torch.Tensor], vae_config: Any) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> ``first_stage_model.*`` keys (mid attention as 1x1 convs)."""
    return _apply_rules(vae_state_dict, _vae_rules(vae_config), VAE_PREFIX, "vae")


# ------------------------------------------------------------------------------------- text encoder


def text_layout(te_config: Any) -> str:
    """SD2's text encoder is OpenCLIP ViT-H/14, with plain GELU; SD1's is OpenAI's CLIP ViT-L/14, with quick_gelu.
    Small test encoders of either kind keep their kind's layout."""
    return "openclip" if _cfg(te_config, "hidden_act") == "gelu" else "clip"


def _normalize_text_keys(te_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the ``text_model.`` wrapper (absent on CLIPTextModel since transformers 5.6) and drop
    non-learned buffers, so that both transformers generations give the same keys."""
    out = {}
    for key, tensor in te_state_dict.items():
        key = key.removeprefix("text_model.")
        if key not in _DROPPED_TEXT_KEYS:
            out[key] = tensor
    return out


def _text_to_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # SD1 stores the HF CLIPTextModel verbatim; convert_ldm_clip_checkpoint only strips the prefix.
    out = {}
    for key, tensor in sd.items():
        inner = key if key == "text_projection.weight" else "text_model." + key
        out[CLIP_PREFIX + inner] = tensor
    return out


# Inverse of DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"] for the inside of one layer.
_OPENCLIP_LAYER_RENAMES = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def _text_to_openclip(sd: dict[str, torch.Tensor], te_config: Any) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    out = {}
    num_layers = int(_cfg(te_config, "num_hidden_layers"))

    # open_clip's nn.MultiheadAttention keeps q, k, v as one [3 * width, width] in_proj; the forward
    # converter splits it in that order (q, k, v).
    for layer in range(num_layers):
        src = f"encoder.layers.{layer}.self_attn."
        dst = f"{OPENCLIP_PREFIX}transformer.resblocks.{layer}.attn."
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"{src}{p}_proj.{kind}", None) for p in ("q", "k", "v")]
            if all(p is None for p in parts):
                continue
            if any(p is None for p in parts):
                raise KeyError(f"text encoder: layer {layer} has only part of q/k/v {kind}")
            out[f"{dst}in_proj_{kind}"] = torch.cat(parts, dim=0)

    def transposed(rest: str, tensor: torch.Tensor) -> torch.Tensor:
        # open_clip applies ``x @ text_projection``; HF's Linear stores the transpose.
        return tensor.T

    rules = [
        _Rule("embeddings.token_embedding.weight", "token_embedding.weight"),
        # open_clip keeps the positional embedding as a bare nn.Parameter, not an Embedding.
        _Rule("embeddings.position_embedding.weight", "positional_embedding"),
        _Rule("final_layer_norm.", "ln_final."),
        _Rule("text_projection.weight", "text_projection", transform=transposed),
    ]
    rules += [
        _Rule(f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}.", _OPENCLIP_LAYER_RENAMES)
        for layer in range(num_layers)
    ]
    out.update(_apply_rules(sd, rules, OPENCLIP_PREFIX, "text encoder (openclip)"))
    return out


def text_encoder_to_ldm(
    te_state_dict: Mapping[str, torch.Tensor], te_config: Any, layout: str | None = None
) -> dict[str, torch.Tensor]:
    """diffusers/transformers CLIP text encoder state dict -> LDM keys.

    ``layout``: ``"clip"`` (SD1, ``cond_stage_model.transformer.text_model.*``) or ``"openclip"``
    (SD2, ``cond_stage_model.model.*``). ``None`` picks from the config (``text_layout``).
    """
    layout = layout or text_layout(te_config)
    sd = _normalize_text_keys(te_state_dict)
    if layout == "clip":
        return _text_to_clip(sd)
    if layout == "openclip":
        return _text_to_openclip(sd, te_config)
    raise ValueError(f"layout must be 'clip' or 'openclip', got {layout!r}")


# ------------------------------------------------------------------------------------------- all


def ldm_keys(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module) -> set[str]:
    """The keys ``pipeline_to_ldm`` writes for these modules, found without copying any weight."""

    def on_meta(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {key: tensor.to("meta") for key, tensor in module.state_dict().items()}

    return set(unet_to_ldm(on_meta(unet), unet.config)) | set(vae_to_ldm(on_meta(vae), vae.config)) | \
        set(text_encoder_to_ldm(on_meta(text_encoder), text_encoder.config))



def pipeline_to_ldm(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    dtype: torch.dtype | None = torch.float16,
    text_encoder_layout: str | None = None,
) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict for the whole SD model, ready for ``safetensors.torch.save_file``.

    Floating-point tensors are cast to ``dtype`` (``None`` keeps them); all tensors are moved to
    the CPU, made contiguous and detached from autograd.
    """
    parts = [
        unet_to_ldm(unet.state_dict(), unet.config),
        vae_to_ldm(vae.state_dict(), vae.config),
        text_encoder_to_ldm(text_encoder.state_dict(), text_encoder.config, layout=text_encoder_layout),
    ]
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, tensor in part.items():
            tensor = tensor.detach()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(device="cpu", dtype=dtype)
            else:
                tensor = tensor.to(device="cpu")
            out[key] = tensor.contiguous()
    return out
