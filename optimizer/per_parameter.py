"""Stepping parameters a bucket at a time: the memory means of doc/MEMORY.md that a whole-model optimizer step cannot
give.

- Fused backward: parameters are updated inside the backward pass as soon as their gradients are complete, a bucket
  of about BUCKET_ELEMENTS at a time, and the gradients are freed at once, so the whole model's gradients never
  exist together (PyTorch's `register_post_accumulate_grad_hook`, as in its "optimizer step in the backward pass"
  recipe, with buckets so that the optimizer's multi-tensor kernels still update many tensors per launch).
- bf16 weights with stochastic rounding: the trained weights are stored in bf16 (half the memory of fp32). Each
  update is computed in fp32 on a temporary copy of one bucket and rounded back to bf16 stochastically (up or
  down with the probability of the remainder), so updates far smaller than bf16's spacing still move the weights
  on average instead of being rounded away (Zamirai et al. 2020, "Revisiting BFloat16 Training"; as OneTrainer does).

`BucketedOptimizer` runs one inner optimizer (torch's, bitsandbytes' or lion-pytorch's) over fp32 stand-ins of the
parameters: a stand-in holds its parameter's data (or an fp32 copy: of bf16 weights, and of channels-last ones for
bitsandbytes) only while its bucket steps. bf16 weights (with torch's and lion-pytorch's optimizers) step a
`FlatBucket` at a time instead: the bucket's fp32 copy is one stand-in, so the host's work per step is a few calls
per bucket rather than per parameter. Its `state_dict` has the layout of one optimizer over all the parameters
(flat buckets' states split per parameter), so a run saved with these means resumes without them and the other way
round.
"""
from __future__ import annotations

from typing import Callable

import torch

STOCHASTIC_ROUNDING_SEED_OFFSET = 0x5EED  # the rounding stream is seeded from the run's seed, apart from the rest
# Parameters' elements updated together: few enough that a bucket's gradients and fp32 copies stay small next to
# the model (160 MiB for bf16 weights), many enough that a bucket is a few kernel launches for dozens of tensors.
BUCKET_ELEMENTS = 1 << 24


def round_stochastically_(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rounds fp32 `values` in place to one of their two nearest bf16 neighbours each, with probability proportional
    to closeness (the results are bf16 values: a copy into bf16 keeps them exactly). bf16 is the upper half of
    fp32's bits, so adding a uniform random number to the lower 16 bits before cutting them off rounds up exactly
    when the dropped part exceeds the random draw."""
    noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    values.view(torch.int32).add_(noise).bitwise_and_(-65536)
    return values


def in_memory_order(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor`'s elements as a 1-D view in the order `like`'s lie in memory (a channels-last weight without a copy;
    `like` and `tensor` are dense: contiguous or channels-last). A tensor laid out otherwise is copied first."""
    if tensor.stride() != like.stride():
        tensor = torch.empty_like(like, dtype=tensor.dtype).copy_(tensor)
    return tensor.as_strided((tensor.numel(),), (1,))


class BucketedOptimizer(torch.optim.Optimizer):
    """Steps the parameters handed to `ready(p)` a bucket at a time (`flush()` steps what is left). The outer object
    has one param group, so LR schedules drive it as any optimizer; its lr reaches the inner one at each bucket.
    bf16 parameters are updated through fp32 copies and `round_stochastically_` with `rounding`.

    `bitsandbytes`: the inner optimizer is bitsandbytes'. It steps contiguous tensors only (it replaces a
    channels-last tensor with a contiguous copy, which would leave a stand-in's parameter unchanged), so such
    parameters step through contiguous fp32 copies too; and its tensors are stepped here rather than by its own
    `step`, which waits for the GPU after every tensor (for its paged variants, not used here): that wait would
    keep the host from queuing work ahead of the GPU, in the backward pass too with fused_backward."""

    def __init__(self, params, make_inner: Callable[[list], torch.optim.Optimizer], lr: float,
                 rounding: torch.Generator | None = None, bitsandbytes: bool = False, measure_norm: bool = False):
        params = [p for p in params if p.requires_grad]
        super().__init__(params, {"lr": lr})
        self.rounding = rounding
        self.bitsandbytes = bitsandbytes
        self.params = params
        self.make_inner = make_inner
        self.index = {id(p): i for i, p in enumerate(params)}
        # Buckets stepped as one flat tensor, by their parameters' ids; None: a bucket that steps tensor by tensor.
        self.flat_buckets: dict[tuple[int, ...], FlatBucket | None] = {}
        self.released = torch.empty(0, device=params[0].device)  # what a stand-in holds between its steps
        self.stand_ins = {p: torch.nn.Parameter(self.released) for p in params}
        self.inner = make_inner(list(self.stand_ins.values()))
        self.pending: list[torch.Tensor] = []
        self.pending_elements = 0
        # The squared norm of the gradients stepped since the last read, where nothing else can measure it (their
        # gradients are freed as they are stepped: fused_backward).
        self.squared_norm = torch.zeros((), device=params[0].device) if measure_norm else None

    def ready(self, p: torch.Tensor) -> None:
        """`p`'s gradient is complete: step it with its bucket once the bucket is full (flush is no_grad)."""
        self.pending.append(p)
        self.pending_elements += p.numel()
        if self.pending_elements >= BUCKET_ELEMENTS:
            self.flush()

    def _steps_in_place(self, p: torch.Tensor) -> bool:
        return p.dtype == torch.float32 and (p.is_contiguous() or not self.bitsandbytes)

    def _flat(self, tensor: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """`tensor` (`p` or its gradient) as one row of the bucket's fp32 copy, in the stand-in's element order."""
        return tensor.reshape(-1) if self.bitsandbytes else in_memory_order(tensor, p)

    def _shaped(self, row: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """A row of the bucket's fp32 copy as `p`'s stand-in: contiguous, or laid out as `p`."""
        return row.view(p.shape) if self.bitsandbytes else row.as_strided(p.shape, p.stride())

    @torch.no_grad()
    def flush(self) -> None:
        """Steps the pending parameters and frees their gradients. Parameters that cannot step in place (bf16, or
        channels-last for an optimizer that needs contiguous tensors) step through one fp32 copy of them all, made
        and written back with a few kernels (not a few per parameter); where it can, that copy is a FlatBucket's one
        stand-in."""
        if not self.pending:
            return
        pending, self.pending, self.pending_elements = self.pending, [], 0
        if self.squared_norm is not None:
            self.squared_norm += torch.stack(torch._foreach_norm([p.grad for p in pending], dtype=torch.float32)
                                             ).square().sum()
        bucket = self._flat_bucket(pending)
        if bucket is not None:
            bucket.step(self.param_groups[0]["lr"], self.rounding)
            return
        copied = [p for p in pending if not self._steps_in_place(p)]
        if copied:
            sizes = [p.numel() for p in copied]
            # Concatenated in their own dtype, then cast: a cat that also casts copies each tensor with its own kernel.
            weights = torch.cat([self._flat(p.detach(), p) for p in copied]).float()
            grads = torch.cat([self._flat(p.grad, p) for p in copied]).float()
            for p, weight, grad in zip(copied, weights.split(sizes), grads.split(sizes)):
                self.stand_ins[p].data, self.stand_ins[p].grad = self._shaped(weight, p), self._shaped(grad, p)
        for p in pending:
            if self._steps_in_place(p):
                self.stand_ins[p].data, self.stand_ins[p].grad = p.detach(), p.grad
        group = self.inner.param_groups[0]
        everything, group["params"] = group["params"], [self.stand_ins[p] for p in pending]
        group["lr"] = self.param_groups[0]["lr"]
        try:  # over the bucket only: the optimizer's own loop over every parameter costs more than a small bucket
            self._step_inner()
        finally:
            group["params"] = everything
        for p in pending:
            self.stand_ins[p].grad = None
            self.stand_ins[p].data = self.released
            p.grad = None
        if copied:
            del grads
            if copied[0].dtype == torch.bfloat16:  # a model's trained weights share one dtype
                weights = round_stochastically_(weights, self.rounding).to(torch.bfloat16)
            torch._foreach_copy_([p.detach() for p in copied],
                                 [self._shaped(row, p) for p, row in zip(copied, weights.split(sizes))])

    def _step_inner(self) -> None:
        if not self.bitsandbytes:
            self.inner.step()
            return
        inner, group = self.inner, self.inner.param_groups[0]
        if not inner.initialized:  # as bitsandbytes' own step begins
            inner.check_overrides()
            inner.to_gpu()
            inner.initialized = True
        for index, stand_in in enumerate(group["params"]):
            if not inner.state[stand_in]:
                inner.init_state(group, stand_in, 0, index)
            inner.update_step(group, stand_in, 0, index)

    @torch.no_grad()
    def step(self, closure=None):
        """Steps every parameter with a gradient that the backward pass has not handed to `ready` (all of them
        without fused_backward), then the last, partly filled bucket."""
        waiting = {id(p) for p in self.pending}
        for p in self.params:
            if p.grad is not None and id(p) not in waiting:
                self.ready(p)
        self.flush()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def _flat_bucket(self, pending: list[torch.Tensor]) -> FlatBucket | None:
        """The flat bucket of exactly these parameters, made at their first step together (the backward pass hands
        them over in the same order every step, so its buckets repeat too). Only bf16 weights, stepped by an optimizer
        of per-element states (torch's, lion-pytorch's: not bitsandbytes', whose 8-bit blocks would span tensors),
        with the same optimizer step count in each (a parameter without a gradient in some step falls behind). Their
        states move from the per-tensor stand-ins (or other buckets) into the bucket's."""
        key = tuple(map(id, pending))
        if key in self.flat_buckets:
            return self.flat_buckets[key]
        if self.bitsandbytes or any(p.dtype != torch.bfloat16 for p in pending):
            self.flat_buckets[key] = None
            return None
        ids = set(key)
        for other in [k for k in self.flat_buckets if ids & set(k)]:
            overlapping = self.flat_buckets.pop(other)  # a parameter's state lives in one place
            if overlapping is not None:
                self._dissolve(overlapping)
        states = [self.inner.state.get(self.stand_ins[p], {}) for p in pending]
        if not _aligned(states):
            self.flat_buckets[key] = None  # tensor by tensor, until a flat bucket takes some of these parameters
            return None
        for p in pending:
            self.inner.state.pop(self.stand_ins[p], None)
        self.flat_buckets[key] = bucket = FlatBucket(pending, self.make_inner, self.released)
        if states[0]:
            bucket.inner.state[bucket.stand_in] = {
                k: torch.cat([in_memory_order(state[k], p) for state, p in zip(states, pending)])
                if isinstance(v, torch.Tensor) and v.dim() else v for k, v in states[0].items()}
        return bucket

    def _dissolve(self, bucket: FlatBucket) -> None:
        """The bucket's states back on the per-tensor stand-ins, laid out as each parameter."""
        for p, state in zip(bucket.params, bucket.states()):
            if state:
                self.inner.state[self.stand_ins[p]] = state

    def state_dict(self) -> dict:
        """The inner optimizer's: states by parameter index, one param group; the schedule's lr is the outer one.
        A flat bucket's states are split into its parameters' shapes, as one optimizer over them all would hold."""
        saved = self.inner.state_dict()
        for bucket in self.flat_buckets.values():
            if bucket is not None:
                for p, state in zip(bucket.params, bucket.states()):
                    if state:
                        saved["state"][self.index[id(p)]] = state
        saved["state"] = dict(sorted(saved["state"].items()))
        outer = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": saved["state"], "param_groups": [{**saved["param_groups"][0], **outer}]}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"it holds {sum(len(g['params']) for g in groups)} parameters in {len(groups)} group(s), "
                             f"this model trains {len(self.params)}")
        self.param_groups[0].update({k: groups[0][k] for k in ("lr", "initial_lr") if k in groups[0]})
        self.flat_buckets = {}  # the loaded states go to the per-tensor stand-ins; buckets gather them again
        self.inner.load_state_dict(state_dict)  # state tensors are cast to the stand-ins' fp32


def _aligned(states: list[dict]) -> bool:
    """Whether these per-tensor states can be one flat state: the same keys, and the same values that are not per
    element (AdamW's step count; compared with one wait for the device per key, not one per parameter)."""
    if any(state.keys() != states[0].keys() for state in states):
        return False
    scalars = [k for k, v in states[0].items() if not isinstance(v, torch.Tensor) or v.dim() == 0]
    tensors = [k for k in scalars if isinstance(states[0][k], torch.Tensor)]
    if any(state[k] != states[0][k] for state in states for k in scalars if k not in tensors):
        return False
    return all(bool((torch.stack([state[k] for state in states]) == states[0][k]).all()) for k in tensors)


class FlatBucket:
    """bf16 parameters stepped as one fp32 tensor: one inner optimizer over one stand-in per bucket, so the host
    queues a few kernels per bucket instead of a few Python calls per parameter. The math is the same element by
    element (the optimizers here update each element from its own gradient and state), and the rounding draws the
    same numbers: the bucket's parameters and order are those of the per-tensor path."""

    def __init__(self, params: list[torch.Tensor], make_inner: Callable[[list], torch.optim.Optimizer],
                 released: torch.Tensor):
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.released = released
        self.stand_in = torch.nn.Parameter(released)
        self.inner = make_inner([self.stand_in])

    @torch.no_grad()
    def step(self, lr: float, rounding: torch.Generator) -> None:
        rows = [in_memory_order(p.detach(), p) for p in self.params]  # views of the weights, in memory order
        weights = torch.cat(rows).float()
        self.stand_in.data, self.stand_in.grad = weights, torch.cat(
            [in_memory_order(p.grad, p) for p in self.params]).float()
        for p in self.params:
            p.grad = None
        self.inner.param_groups[0]["lr"] = lr
        self.inner.step()
        self.stand_in.grad, self.stand_in.data = None, self.released
        torch._foreach_copy_(rows, list(round_stochastically_(weights, rounding).to(torch.bfloat16).split(self.sizes)))

    def states(self) -> list[dict]:
        """Each parameter's share of the bucket's state, laid out as the parameter: views of the bucket's tensors, so
        that a checkpoint needs no second copy of the optimizer state on the GPU (torch.save writes a storage once
        however many views of it are saved). Scalars (AdamW's step count) are copied: each parameter counts its own
        steps once stepped tensor by tensor."""
        state = self.inner.state.get(self.stand_in, {})
        shares: list[dict] = [{} for _ in self.params]
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim():
                for share, p, row in zip(shares, self.params, value.split(self.sizes)):
                    share[key] = row.as_strided(p.shape, p.stride())
            else:
                for share in shares:
                    share[key] = value.clone() if isinstance(value, torch.Tensor) else value
        return shares
