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
  Or, compensated: rounded to nearest, with each weight's rounding error kept in a second bf16 tensor and added back
  at its next update (Kahan summation, the paper's other remedy), so that such updates add up as in fp32, for 2 more
  bytes per weight.

`BucketedOptimizer` runs one inner optimizer (torch's, bitsandbytes' or lion-pytorch's) over fp32 stand-ins of the
parameters: a stand-in holds its parameter's data (or an fp32 copy: of bf16 weights, and of channels-last ones for
bitsandbytes) only while its bucket steps. bf16 weights (with torch's and lion-pytorch's optimizers), and every
weight with bitsandbytes', step a `FlatBucket` at a time instead: the bucket is gathered into one pair of buffers
(`GatherBuffers`, through views kept from step to step) and its fp32 copy is one stand-in, so the host's work per
step is a few calls per bucket rather than per parameter. bitsandbytes keeps 32-bit states for its small tensors
(biases, norms' weights): they wait for the end of the step and step in buckets of their own, so that every other
bucket is one tensor of 8-bit states. On CUDA, bf16 weights with bitsandbytes' 8-bit AdamW step in one kernel on
the gathered bf16 weights instead (optimizer/fused_8bit.py). The `state_dict` has the layout of one optimizer over
all the parameters (flat buckets' states split per parameter), so a run saved with these means resumes without them
and the other way round.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import torch

from optimizer import fused_8bit
from optimizer.fused_8bit import COMPENSATION, QUANTIZATION_BLOCK

STOCHASTIC_ROUNDING_SEED_OFFSET = 0x5EED  # the rounding stream is seeded from the run's seed, apart from the rest
# Parameters' elements updated together: few enough that a bucket's gradients and fp32 copies stay small next to
# the model (160 MiB for bf16 weights), many enough that a bucket is a few kernel launches for dozens of tensors.
BUCKET_ELEMENTS = 1 << 24
# bitsandbytes' 8-bit states: which of its state keys hold the blocks' absolute maxima (fused_8bit.QUANTIZATION_BLOCK
# elements each), and which its quantization maps (one tensor shared by every parameter).
BLOCK_BITSANDBYTES_STATES = ("absmax1", "absmax2")
SHARED_BITSANDBYTES_STATES = ("qmap1", "qmap2")


def round_stochastically_(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rounds fp32 `values` in place to one of their two nearest bf16 neighbours each, with probability proportional
    to closeness (the results are bf16 values: a copy into bf16 keeps them exactly). bf16 is the upper half of
    fp32's bits, so adding a uniform random number to the lower 16 bits before cutting them off rounds up exactly
    when the dropped part exceeds the random draw."""
    noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    values.view(torch.int32).add_(noise).bitwise_and_(-65536)
    return values


def round_compensated_(values: torch.Tensor, compensation: torch.Tensor) -> torch.Tensor:
    """Rounds fp32 `values` in place to their nearest bf16 values and writes what that dropped into `compensation`
    (bf16, shaped as `values`), which the next update adds back first (`compensate_`): a weight and its compensation
    together hold about 16 significant bits, so updates far below bf16's spacing add up as in fp32, without noise.
    The dropped part is exact in fp32 (at most 16 significant bits); bf16 keeps its upper 8."""
    rounded = values.to(torch.bfloat16)
    compensation.copy_(values.sub_(rounded))
    return values.copy_(rounded)


def compensate_(values: torch.Tensor, state: dict) -> torch.Tensor:
    """fp32 `values` (the weights about to be updated) plus the rounding error their last compensated rounding kept
    in `state`, if any."""
    if COMPENSATION in state:
        values.add_(state[COMPENSATION])
    return values


def rounding_errors(state: dict, like: torch.Tensor) -> torch.Tensor:
    """The rounding errors compensated rounding keeps in `state` for weights shaped as `like` (zero at first)."""
    if COMPENSATION not in state:
        state[COMPENSATION] = torch.zeros_like(like, dtype=torch.bfloat16)
    return state[COMPENSATION]


def round_to_bf16_(values: torch.Tensor, state: dict, rounding: torch.Generator | None) -> torch.Tensor:
    """fp32 `values` rounded in place to bf16 values: stochastically with `rounding`, or without it compensated,
    their rounding error kept in `state` for the next update."""
    if rounding is not None:
        return round_stochastically_(values, rounding)
    return round_compensated_(values, rounding_errors(state, values))


def in_memory_order(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor`'s elements as a 1-D view in the order `like`'s lie in memory (a channels-last weight without a copy;
    `like` and `tensor` are dense: contiguous or channels-last). A tensor laid out otherwise is copied first."""
    if tensor.stride() != like.stride():
        tensor = torch.empty_like(like, dtype=tensor.dtype).copy_(tensor)
    return tensor.as_strided((tensor.numel(),), (1,))


class BucketedOptimizer(torch.optim.Optimizer):
    """Steps the parameters handed to `ready(p)` a bucket at a time (`step()` steps what is left). The outer object
    has one param group, so LR schedules drive it as any optimizer; its lr reaches the inner one at each bucket.
    bf16 parameters are updated through fp32 copies, rounded back stochastically with `rounding`, or without it
    compensated (`round_compensated_`; the rounding errors are kept in the inner optimizer's states).

    `bitsandbytes`: the inner optimizer is bitsandbytes'. It steps contiguous tensors only (it replaces a
    channels-last tensor with a contiguous copy, which would leave a stand-in's parameter unchanged), so such
    parameters step through copies (as every bucket does that steps flat); and its tensors are stepped here rather
    than by its own `step`, which waits for the GPU after every tensor: that wait would keep the host from queuing
    work ahead of the GPU, in the backward pass too with fused_backward."""

    def __init__(self, params, make_inner: Callable[[list], torch.optim.Optimizer], lr: float,
                 gather_buffers: GatherBuffers, rounding: torch.Generator | None = None, bitsandbytes: bool = False,
                 measure_norm: bool = False):
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
        self.gather_buffers = gather_buffers  # where flat buckets gather, in turn (shared by the run's optimizers)
        self.stand_ins = {p: torch.nn.Parameter(self.released) for p in params}
        self.inner = make_inner(list(self.stand_ins.values()))
        # Parameters handed over and not stepped yet, by whether bitsandbytes keeps 32-bit states for them (smaller
        # than its min_8bit_size): those fill buckets of their own, stepped last unless one fills first.
        self.eight_bit_from = self.inner.args.min_8bit_size if bitsandbytes else 0
        self.pending: dict[bool, list[torch.Tensor]] = {False: [], True: []}
        self.pending_elements = {False: 0, True: 0}
        # The squared norm of the gradients stepped since the last read, where nothing else can measure it (their
        # gradients are freed as they are stepped: fused_backward).
        self.squared_norm = torch.zeros((), device=params[0].device) if measure_norm else None

    def ready(self, p: torch.Tensor) -> None:
        """`p`'s gradient is complete: step it with its bucket once the bucket is full (flush is no_grad)."""
        small = p.numel() < self.eight_bit_from
        self.pending[small].append(p)
        self.pending_elements[small] += p.numel()
        if self.pending_elements[small] >= BUCKET_ELEMENTS:
            self.flush(small)

    def _steps_in_place(self, p: torch.Tensor) -> bool:
        return p.dtype == torch.float32 and (p.is_contiguous() or not self.bitsandbytes)

    def _flat(self, tensor: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """`tensor` (`p` or its gradient) as one row of the bucket's fp32 copy, in the stand-in's element order."""
        return tensor.reshape(-1) if self.bitsandbytes else in_memory_order(tensor, p)

    def _shaped(self, row: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """A row of the bucket's fp32 copy as `p`'s stand-in: contiguous, or laid out as `p`."""
        return row.view(p.shape) if self.bitsandbytes else row.as_strided(p.shape, p.stride())

    @torch.no_grad()
    def flush(self, small: bool) -> None:
        """Steps the pending parameters of one kind (`small`: with 32-bit bitsandbytes states) and frees their
        gradients. Parameters that cannot step in place (bf16, or channels-last for an optimizer that needs
        contiguous tensors) step through one fp32 copy of them all, made and written back with a few kernels (not a
        few per parameter); where it can, that copy is a FlatBucket's one stand-in."""
        pending = self.pending[small]
        if not pending:
            return
        self.pending[small], self.pending_elements[small] = [], 0
        if self.squared_norm is not None:
            self.squared_norm += torch.stack(torch._foreach_norm([p.grad for p in pending], dtype=torch.float32)
                                             ).square().sum()
        bucket = self._flat_bucket(pending)
        if bucket is not None:
            bucket.step(self.param_groups[0]["lr"], self.rounding, self.gather_buffers)
            return
        copied = [p for p in pending if not self._steps_in_place(p)]
        if copied:
            sizes = [p.numel() for p in copied]
            # Concatenated in their own dtype, then cast: a cat that also casts copies each tensor with its own kernel.
            weights = torch.cat([self._flat(p.detach(), p) for p in copied]).float()
            grads = torch.cat([self._flat(p.grad, p) for p in copied]).float()
            for p, weight, grad in zip(copied, weights.split(sizes), grads.split(sizes)):
                self.stand_ins[p].data, self.stand_ins[p].grad = self._shaped(weight, p), self._shaped(grad, p)
                compensate_(self.stand_ins[p].data, self.inner.state.get(self.stand_ins[p], {}))
        for p in pending:
            if self._steps_in_place(p):
                self.stand_ins[p].data, self.stand_ins[p].grad = p.detach(), p.grad
        group = self.inner.param_groups[0]
        everything, group["params"] = group["params"], [self.stand_ins[p] for p in pending]
        group["lr"] = self.param_groups[0]["lr"]
        try:  # over the bucket only: the optimizer's own loop over every parameter costs more than a small bucket
            step_inner(self.inner, self.bitsandbytes)
        finally:
            group["params"] = everything
        for p in pending:
            self.stand_ins[p].grad = None
            self.stand_ins[p].data = self.released
            p.grad = None
        if copied:
            del grads
            if copied[0].dtype == torch.bfloat16:  # a model's trained weights share one dtype
                if self.rounding is not None:
                    round_stochastically_(weights, self.rounding)
                else:
                    for p, row in zip(copied, weights.split(sizes)):
                        round_to_bf16_(self._shaped(row, p), self.inner.state[self.stand_ins[p]], None)
                weights = weights.to(torch.bfloat16)
            copy_into(copied, [self._shaped(row, p) for p, row in zip(copied, weights.split(sizes))])

    @torch.no_grad()
    def step(self, closure=None):
        """Steps every parameter with a gradient that the backward pass has not handed to `ready` (all of them
        without fused_backward), then the last, partly filled buckets."""
        waiting = {id(p) for pending in self.pending.values() for p in pending}
        for p in self.params:
            if p.grad is not None and id(p) not in waiting:
                self.ready(p)
        self.flush(False)
        self.flush(True)
        self.gather_buffers.release()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def _flat_bucket(self, pending: list[torch.Tensor]) -> FlatBucket | None:
        """The flat bucket of exactly these parameters, made at their first step together (the backward pass hands
        them over in the same order every step, so its buckets repeat too). bitsandbytes' optimizers step every
        bucket flat (tensor by tensor they cost a few Python calls each); torch's and lion-pytorch's the bf16
        weights (fp32 weights they step in place, many tensors per kernel). The parameters must be at the same
        optimizer step (one without a gradient in some step falls behind). Their states move from the per-tensor
        stand-ins (or other buckets) into the bucket's."""
        key = tuple(map(id, pending))
        if key in self.flat_buckets:
            return self.flat_buckets[key]
        if not self.bitsandbytes and any(p.dtype != torch.bfloat16 for p in pending):
            self.flat_buckets[key] = None
            return None
        ids = set(key)
        for other in [k for k in self.flat_buckets if ids & set(k)]:
            overlapping = self.flat_buckets.pop(other)  # a parameter's state lives in one place
            if overlapping is not None:
                self._dissolve(overlapping)
        bucket = FlatBucket(pending, self.make_inner, self.released, self.bitsandbytes,
                            eight_bit=self.bitsandbytes and pending[0].numel() >= self.eight_bit_from)
        if not bucket.take([self.inner.state.get(self.stand_ins[p], {}) for p in bucket.params]):
            self.flat_buckets[key] = None  # tensor by tensor, until a flat bucket takes some of these parameters
            return None
        for p in pending:
            self.inner.state.pop(self.stand_ins[p], None)
        self.flat_buckets[key] = bucket
        return bucket

    def _dissolve(self, bucket: FlatBucket) -> None:
        """The bucket's states back on the per-tensor stand-ins, laid out as each parameter."""
        for p, state in zip(bucket.params, bucket.states()):
            if state:
                self.inner.state[self.stand_ins[p]] = state

    def state_dict(self) -> dict:
        """The inner optimizer's: states by parameter index, one param group; the schedule's lr is the outer one.
        A flat bucket's states are split into its parameters' shapes, as one optimizer over them all would hold (and
        save: bitsandbytes' state_dict wraps its quantization states its own way)."""
        shares = {self.stand_ins[p]: state for bucket in self.flat_buckets.values() if bucket is not None
                  for p, state in zip(bucket.params, bucket.states()) if state}
        self.inner.state.update(shares)
        try:
            saved = self.inner.state_dict()
        finally:
            for stand_in in shares:
                del self.inner.state[stand_in]
        outer = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": dict(sorted(saved["state"].items())),
                "param_groups": [{**saved["param_groups"][0], **outer}]}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"it holds {sum(len(g['params']) for g in groups)} parameters in {len(groups)} group(s), "
                             f"this model trains {len(self.params)}")
        self.param_groups[0].update({k: groups[0][k] for k in ("lr", "initial_lr") if k in groups[0]})
        self.flat_buckets = {}  # the loaded states go to the per-tensor stand-ins; buckets gather them again
        self.inner.load_state_dict(state_dict)  # state tensors are cast to the stand-ins' fp32
        for state in self.inner.state.values():
            if COMPENSATION in state:  # bf16 values: back to bf16 exactly
                state[COMPENSATION] = state[COMPENSATION].to(torch.bfloat16)


def copy_into(params: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """Copies each source into its parameter (under no_grad)."""
    copy_pairs(*by_layout(params, sources))


def by_layout(params: list[torch.Tensor], sources: list[torch.Tensor]) -> tuple[tuple[list, list], list]:
    """The (parameter, source) pairs laid out alike, as two lists, and the others. torch's multi-tensor copy needs
    every pair laid out alike to copy many tensors per kernel (one channels-last weight with a contiguous source
    sends the whole list down its path of a copy per tensor), so pairs laid out differently are copied apart."""
    alike: tuple[list, list] = ([], [])
    apart = []
    for p, source in zip(params, sources):
        if p.stride() == source.stride():
            alike[0].append(p)
            alike[1].append(source)
        else:
            apart.append((p, source))
    return alike, apart


def copy_pairs(alike: tuple[list, list], apart: list) -> None:
    if alike[0]:
        torch._foreach_copy_(*alike)
    for p, source in apart:
        p.copy_(source)


class GatherBuffers:
    """Two buffers (weights, gradients, in the weights' dtype) as long as the longest bucket: buckets step one after
    another, so one pair serves every flat bucket of a run's optimizers, and views of it can be kept from step to
    step (building views costs the host more than copying costs the GPU). Their memory is taken at the first bucket
    of an optimizer step and given back after its last (`release`): outside the steps, and at the backward pass's
    peak without fused_backward, they hold none. The views stay valid: the buffers' storage is resized, not
    replaced."""

    def __init__(self, elements: int):
        self.elements = elements
        self.pairs: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_params(cls, params: list[torch.Tensor]) -> GatherBuffers:
        """As long as a bucket of these can be: a bucket's worth less one element, then the largest (or all of them,
        if fewer); rows padded."""
        longest = min(BUCKET_ELEMENTS - 1 + max((p.numel() for p in params), default=0), sum(p.numel() for p in params))
        return cls(longest + QUANTIZATION_BLOCK * len(params))

    def get(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if like.dtype not in self.pairs:
            weights = torch.empty(self.elements, dtype=like.dtype, device=like.device)
            self.pairs[like.dtype] = weights, torch.empty_like(weights)
        for buffer in self.pairs[like.dtype]:
            if buffer.untyped_storage().size() == 0:
                buffer.untyped_storage().resize_(buffer.numel() * buffer.element_size())
        return self.pairs[like.dtype]

    def release(self) -> None:
        for pair in self.pairs.values():
            for buffer in pair:
                buffer.untyped_storage().resize_(0)


class Gathered:
    """A flat bucket's rows in the gather buffers, as views made once: each weight's and gradient's row laid out as
    the bucket lays it (`shaped`), and the padding after rows."""

    def __init__(self, params: list[torch.Tensor], rows: list[int], buffers: tuple[torch.Tensor, torch.Tensor],
                 shaped: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.key = self.key_of(params)
        starts = [0, *itertools.accumulate(rows)]
        self.weights, self.grads = (buffer[:starts[-1]] for buffer in buffers)
        self.weight_rows, self.grad_rows = ([shaped(flat[start:start + row], p) for start, row, p in
                                             zip(starts, rows, params)] for flat in (self.weights, self.grads))
        # Other buckets' weights and gradients lie there: a padding element must read as 0.
        self.padding = [flat[start + p.numel():start + row] for flat in (self.weights, self.grads)
                        for start, p, row in zip(starts, params, rows) if row > p.numel()]
        self.live = [p.detach() for p in params]
        self.weights_in = by_layout(self.weight_rows, self.live)
        self.weights_out = by_layout(self.live, self.weight_rows)

    @staticmethod
    def key_of(params: list[torch.Tensor]) -> tuple[int, ...]:
        """Where the weights lie: the views of them hold while it stays (the EMA's swap can move weights)."""
        return tuple(p.data_ptr() for p in params)


def step_inner(inner: torch.optim.Optimizer, bitsandbytes: bool) -> None:
    """Steps the inner optimizer over its stand-ins. bitsandbytes' tensor by tensor here, not by its own `step`,
    which waits for the GPU after every tensor."""
    if not bitsandbytes:
        inner.step()
        return
    group = inner.param_groups[0]
    for index, stand_in in enumerate(group["params"]):
        bitsandbytes_state(inner, stand_in, index)
        inner.update_step(group, stand_in, 0, index)


def bitsandbytes_state(inner: torch.optim.Optimizer, stand_in: torch.Tensor, index: int = 0) -> dict:
    """bitsandbytes' state of its `index`-th parameter, made as its own step makes it (and, at the first, its
    set-up)."""
    if not inner.initialized:  # as bitsandbytes' own step begins
        inner.check_overrides()
        inner.to_gpu()
        inner.initialized = True
    if not inner.state[stand_in]:
        inner.init_state(inner.param_groups[0], stand_in, 0, index)
    return inner.state[stand_in]


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
    """Parameters stepped as one tensor, gathered into the shared buffers: an inner optimizer over one stand-in per
    bucket, so the host queues a few kernels per bucket instead of a few Python calls per parameter. The math is the
    same element by element: these optimizers update each element from its own gradient and state.

    torch's and lion-pytorch's optimizers (bf16 weights): rows in memory order and in the per-tensor path's order,
    so the rounding draws the same numbers as there. bitsandbytes' (any weights): rows in logical order, as its
    per-tensor states are laid out. A bucket of the weights it keeps 8-bit states for (`eight_bit`) is padded to its
    quantization blocks, so that no block spans two weights and each is quantized as when stepped alone; a bucket
    of the smaller ones keeps 32-bit states, as they do stepped alone."""

    def __init__(self, params: list[torch.Tensor], make_inner: Callable[[list], torch.optim.Optimizer],
                 released: torch.Tensor, bitsandbytes: bool = False, eight_bit: bool = False):
        self.params = params
        self.bitsandbytes = bitsandbytes
        self.rows = [p.numel() + (-p.numel() % QUANTIZATION_BLOCK if eight_bit else 0) for p in params]
        self.released = released
        self.stand_in = torch.nn.Parameter(released)
        self.inner = make_inner([self.stand_in])
        if bitsandbytes and not eight_bit:
            self.inner.args.min_8bit_size = math.inf  # 32-bit states, whatever the stand-in's size
        # bf16 weights with 8-bit states step in one kernel that reads them as they are (fused_8bit).
        self.fused_8bit = eight_bit and fused_8bit.usable(self.inner, params[0])
        self.gathered: Gathered | None = None

    def _row(self, tensor: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(-1) if self.bitsandbytes else in_memory_order(tensor, p)

    @torch.no_grad()
    def step(self, lr: float, rounding: torch.Generator | None, buffers: GatherBuffers) -> None:
        """Gathers the weights and gradients into the buffers (the gradients are freed), steps the stand-in on them
        (in the fused kernel, or on fp32 copies rounded back for bf16 weights: stochastically with `rounding`, or
        without it compensated), and copies the weights back."""
        gathered = self._gather(buffers)
        self.inner.param_groups[0]["lr"] = lr
        if self.fused_8bit:
            self.stand_in.data = gathered.weights  # bitsandbytes makes the state from it
            state = bitsandbytes_state(self.inner, self.stand_in)
            if rounding is None:
                rounding_errors(state, gathered.weights)
            fused_8bit.step(self.inner, state, gathered.weights, gathered.grads, rounding)
        else:
            weights = gathered.weights.float()  # fp32 weights: no copy
            bf16 = self.params[0].dtype == torch.bfloat16  # a model's trained weights share one dtype
            if bf16:
                compensate_(weights, self.inner.state.get(self.stand_in, {}))
            self.stand_in.data, self.stand_in.grad = weights, gathered.grads.float()
            step_inner(self.inner, self.bitsandbytes)
            self.stand_in.grad = None
            if bf16:  # bf16 values, kept exactly by the copy
                gathered.weights.copy_(round_to_bf16_(weights, self.inner.state[self.stand_in], rounding))
        self.stand_in.data = self.released
        copy_pairs(*gathered.weights_out)

    def _gather(self, buffers: GatherBuffers) -> Gathered:
        pair = buffers.get(self.params[0])
        if self.gathered is None or self.gathered.key != Gathered.key_of(self.params):
            self.gathered = Gathered(self.params, self.rows, pair, self._shaped)
        gathered = self.gathered
        copy_pairs(*gathered.weights_in)
        copy_into(gathered.grad_rows, [p.grad for p in self.params])
        if gathered.padding:
            torch._foreach_zero_(gathered.padding)
        for p in self.params:
            p.grad = None
        return gathered

    def _shaped(self, row: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """A (padded) row of the bucket as `p`: contiguous for bitsandbytes, laid out as `p` otherwise (a view)."""
        return row[:p.numel()].view(p.shape) if self.bitsandbytes else row.as_strided(p.shape, p.stride())

    def take(self, states: list[dict]) -> bool:
        """Takes over the parameters' per-tensor states (in `self.params`' order; empty before their first step),
        unless they cannot be one (`_aligned`): then False."""
        if not _aligned(states):
            return False
        if states[0]:
            self.inner.state[self.stand_in] = {key: self._joined(key, [state[key] for state in states], states[0])
                                               for key in states[0]}
        return True

    def _joined(self, key: str, values: list, first: dict):
        """One state value of the stand-in, from its parameters' values."""
        if not isinstance(values[0], torch.Tensor) or not values[0].dim() or key in SHARED_BITSANDBYTES_STATES:
            return values[0]
        if key in BLOCK_BITSANDBYTES_STATES:
            return torch.cat(values)
        # A padding element must read as 0: in 8 bits, the code of 0 in the state's quantization map.
        fill = first[f"qmap{key[-1]}"].abs().argmin().to(torch.uint8) if values[0].dtype == torch.uint8 else \
            values[0].new_zeros(())
        pieces = []
        for value, p, row in zip(values, self.params, self.rows):
            pieces += [self._row(value, p), fill.expand(row - p.numel())]
        return torch.cat(pieces)

    def states(self) -> list[dict]:
        """Each parameter's share of the bucket's state, laid out as the parameter: views of the bucket's tensors, so
        that a checkpoint needs no second copy of the optimizer state on the GPU (torch.save writes a storage once
        however many views of it are saved). Scalars (AdamW's step count) are copied: each parameter counts its own
        steps once stepped tensor by tensor."""
        shares: list[dict] = [{} for _ in self.params]
        for key, value in self.inner.state.get(self.stand_in, {}).items():
            if not isinstance(value, torch.Tensor) or not value.dim() or key in SHARED_BITSANDBYTES_STATES:
                for share in shares:
                    share[key] = value.clone() if isinstance(value, torch.Tensor) and not value.dim() else value
            elif key in BLOCK_BITSANDBYTES_STATES:
                for share, part in zip(shares, value.split([row // QUANTIZATION_BLOCK for row in self.rows])):
                    share[key] = part
            else:
                for share, p, part in zip(shares, self.params, value.split(self.rows)):
                    share[key] = self._shaped(part, p)
        return shares
