"""What the UNet learns, and the one training step.

    objectives   noise (offset, pyramid), timesteps, noised_and_target (the one objective), loss types, min-SNR
    flow         rectified flow: its objective, flow sampler, straightness, reflow pairs
    prediction   predict: the UNet's output in fp32 (inputs cast to bf16_weights' dtype)
    step         training_step / compute_loss (train.py's loop and the benchmark), encode_text, BatchShare
"""
