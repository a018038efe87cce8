"""The ShapeJudge plugin in a run (doc/EVALUATION.md): each sample event's images are judged against their prompts
and the scores reach TensorBoard; the end of training prints the first and last scores and writes the before/after
grid. On the untrained tiny model nothing is drawn correctly, which is what the scores must say."""
from __future__ import annotations

from PIL import Image

from tests.conftest import REPO, TINY_MODEL, read_scalars, tensorboard_images, write_json

PROMPTS = ["a red circle", "a blue square", "a purple cross"]


def test_the_judge_scores_every_sample_event_and_shows_before_and_after(tmp_path, small_dataset):
    import train

    samples = write_json(tmp_path / "samples.json", {
        "cfgs": [4], "num_inference_steps": 2, "batch_size": 4,
        "samples": [{"prompt": prompt, "seed": seed} for prompt in PROMPTS for seed in (1, 2)] +
                   [{"prompt": "a photo of a dog", "seed": 1}]})  # not of the shapes world: not judged
    assert train.main(["--resume_ckpt", str(TINY_MODEL), "--data_root", str(small_dataset), "--resolution", "64",
                       "--batch_size", "2", "--max_epochs", "1", "--optimizer_config",
                       str(REPO / "cfgs" / "tiny_optimizer.json"), "--logdir", str(tmp_path / "logs"),
                       "--no_save_ckpt", "--sample_prompts", str(samples), "--sample_steps", "2",
                       "--plugins", "utils.plugins.shape_judge.ShapeJudge"]) == 0
    (run,) = (tmp_path / "logs").iterdir()
    scalars = read_scalars(run)
    steps = [0, 2, 4]
    assert [step for step, _ in scalars["judge/overall"]] == steps
    for prompt in PROMPTS:
        assert [step for step, _ in scalars[f"judge/{prompt}"]] == steps
        assert all(0 <= value <= 1 for _, value in scalars[f"judge/{prompt}"])
    assert {"judge/colour red", "judge/colour blue", "judge/colour purple"} <= set(scalars)
    assert "judge/a photo of a dog" not in scalars
    assert scalars["judge/overall"][0][1] <= 0.5  # an untrained model does not draw what it is asked

    grid = Image.open(run / "before_after.jpg")
    assert grid.size == (2 * 64 + 4, len(PROMPTS) * (64 + 4) - 4)  # one row per judged prompt: before | after
    assert [step for step, _ in tensorboard_images(run)["judge/before_after"]] == [4]
    log = (run / f"{run.name}.log").read_text()
    summary = log[log.index("ShapeJudge: samples judged correct"):]
    assert "step 0 -> step 4" in summary and all(prompt in summary for prompt in PROMPTS)
