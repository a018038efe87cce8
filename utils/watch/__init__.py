"""What watches training, each with its part for the loop (doc/ARCHITECTURE.md).

    sampling    sample files, samplers, SampleSchedule, generate_samples; SampleImages
    validation  validation config, held-out splits, repeatable passes (Validator); ValidationPasses
    ema         the EMA of the trained weights; EMAUpdates
    metrics     TensorBoard scalars; Metrics
    shape_judge whether a demo sample shows what its prompt asks for (judge, is_correct)
"""
