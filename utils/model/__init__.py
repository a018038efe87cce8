"""Stable Diffusion models in and out.

    models.load(path)                        diffusers folder or single .safetensors/.ckpt -> StableDiffusion
    models.save_diffusers / save_single_file the checkpoint writers (atomic)
    ldm_convert.pipeline_to_ldm              diffusers -> original (LDM) key layout for single files
    shipped.load_tokenizer / config_dir      the tokenizer files and model configs that ship in model_configs/
    norms.keep_norms_in_bf16                 the UNet's GroupNorm and LayerNorm in bf16 under bf16 autocast
"""
