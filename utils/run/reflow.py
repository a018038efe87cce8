"""Reflow (doc/RECTIFIED_FLOW.md): before the main epochs, the model's own ODE pairs (noise -> its sample) retrain it
straighter. Its training passes go through the trainer's step and after-step path like any epoch's."""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from utils.objective import flow
from utils.objective.step import encode_text

log = logging.getLogger("train")


class Reflow:
    def __init__(self, args, model, accelerator, run):
        self.args, self.model, self.accelerator, self.run = args, model, accelerator, run

    def run_phase(self, trainer) -> None:
        args, model = self.args, self.model
        self.unet = self.accelerator.unwrap_model(model.unet)
        self.text_encoder = self.accelerator.unwrap_model(model.text_encoder)
        # (without the latent cache: prompt_batches reads the batch shape from its pixels)
        self.prompts = flow.prompt_batches(
            trainer.data.loader(trainer.data.plan(0, trainer.grad_accum), 0, cache=None, whole=True),
            args.reflow_gen_batches, model.vae.config)
        self.ode_steps = flow.reflow_sample_steps(args)
        # Straightness is measured on the same noise and captions every time, so the values compare.
        self.probe_noise = torch.randn(self.prompts[0].latent_shape,
                                       generator=torch.Generator().manual_seed(args.seed))
        pairs_generator, shuffle_generator = (torch.Generator().manual_seed(args.seed + n) for n in (1, 2))
        log.info("Reflow: %d iteration(s) of %d generated pairs (%d-step ODE), %d epoch(s) each", args.reflow_steps,
                 sum(p.latent_shape[0] for p in self.prompts), self.ode_steps, args.reflow_train_epochs)
        trainer.phase = "reflow"
        self._measure(trainer.global_step)
        for iteration in range(args.reflow_steps):
            pairs = flow.new_pairs_store(self.prompts, self.run.path)
            try:
                with flow.eval_mode(self.unet, self.text_encoder):
                    flow.generate_pairs(self.unet, self._embed, self.prompts, self.ode_steps,
                                        model.scheduler.config, pairs_generator, pairs, self.accelerator.autocast,
                                        f"reflow {iteration + 1}/{args.reflow_steps}: generating")
                for reflow_epoch in range(args.reflow_train_epochs):
                    order = pairs.epoch(args.batch_size, shuffle_generator)
                    trainer.steps_bar = tqdm(order, desc=f"reflow {iteration + 1}/{args.reflow_steps} epoch "
                                             f"{reflow_epoch + 1}/{args.reflow_train_epochs}", unit="step",
                                             leave=False, dynamic_ncols=True)
                    loss = torch.zeros((), device=self.accelerator.device)
                    trainer.train_steps(((step, pairs.batch(rows)) for step, rows in enumerate(trainer.steps_bar)),
                                        len(order), loss)
                    if trainer.stopped:
                        return
                    self.run.tb.add_scalar("loss/reflow_epoch", (loss / len(order)).item(), trainer.global_step)
            finally:
                pairs.discard()
            self._measure(trainer.global_step)
            trainer.emit("reflow_iteration_end")
        trainer.phase = "epochs"

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return encode_text(self.text_encoder, input_ids, self.args.clip_skip)

    def _measure(self, step: int) -> None:
        with flow.eval_mode(self.unet, self.text_encoder), self.accelerator.autocast():
            measures = flow.measure(self.unet, self._embed(self.prompts[0].input_ids),
                                    self.probe_noise.to(self.unet.device), self.ode_steps, self.model.scheduler.config)
        self.run.tb.add_scalar("reflow/straightness", measures.straightness, step)
        self.run.tb.add_scalar("reflow/one_step_error", measures.one_step_error, step)
        log.info("Reflow at step %d: straightness %.5f, one-step error %.5f", step, measures.straightness,
                 measures.one_step_error)
