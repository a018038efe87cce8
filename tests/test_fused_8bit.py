"""optimizer/fused_8bit.py: bitsandbytes' 8-bit blockwise AdamW on bf16 weights in one Triton kernel, with
stochastic rounding, checked against the formula. On a GPU (CUDA_VISIBLE_DEVICES set) the compiled kernel runs, on
the CPU Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET)."""
from __future__ import annotations

import copy

import pytest
import torch

from optimizer import fused_8bit
from optimizer.optimizers import OptimizerSettings, TrainingOptimizers, make_optimizer
from optimizer.per_parameter import BUCKET_ELEMENTS, COMPENSATION, FlatBucket, GatherBuffers, bitsandbytes_state

pytest.importorskip("triton")  # Linux installs have it (requirements.txt); the kernel needs it
bnb = pytest.importorskip("bitsandbytes")

BLOCK = fused_8bit.QUANTIZATION_BLOCK
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled kernel, or Triton's interpreter


def adamw8bit(weights: torch.Tensor, **settings) -> tuple[torch.optim.Optimizer, torch.nn.Parameter]:
    """bitsandbytes' AdamW8bit over one stand-in of `weights`, as a flat bucket holds it."""
    stand_in = torch.nn.Parameter(weights)
    return bnb.optim.AdamW8bit([stand_in], min_8bit_size=BLOCK, **settings), stand_in


def dequantized(state: dict, key: int) -> torch.Tensor:
    codes, absmax, qmap = state[f"state{key}"], state[f"absmax{key}"], state[f"qmap{key}"]
    return qmap[codes.long()] * absmax.repeat_interleave(BLOCK)


def bf16_neighbours(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each fp32 value's bf16 neighbours toward and away from zero (equal where it is a bf16 value)."""
    toward = (values.view(torch.int32) & -65536).view(torch.float32)
    away = torch.where(toward == values, toward, (toward.view(torch.int32) + 65536).view(torch.float32))
    return toward, away


def adamw_step(weights, m, v, grads, lr, betas, eps, decay, step):
    """bitsandbytes' AdamW update in fp32 (`step`: the step count after it): the weights and the moments after it."""
    m = betas[0] * m + (1 - betas[0]) * grads
    v = betas[1] * v + (1 - betas[1]) * grads * grads
    correction1, correction2 = 1 - betas[0] ** step, (1 - betas[1] ** step) ** 0.5
    return (weights - lr * correction2 / correction1 * m / (v.sqrt() + correction2 * eps)) * (1 - lr * decay), m, v


def test_one_step_is_bitsandbytes_adamw_with_stochastic_rounding():
    """From states already holding two steps, one step: the states follow Adam's moments from their dequantized
    values, each re-quantized to its map's nearest code with its block's new maximum; the weight moves by
    bitsandbytes' update, then decays, then lands on one of its two bf16 neighbours; a NaN or inf gradient zeroes its
    element's states and leaves its weight."""
    generator = torch.Generator().manual_seed(0)
    weights = (torch.randn(4 * BLOCK, generator=generator) * 0.1).bfloat16().to(DEVICE)
    lr, betas, eps, decay = 3e-3, (0.9, 0.99), 1e-6, 0.05
    inner, stand_in = adamw8bit(weights, lr=lr, betas=betas, eps=eps, weight_decay=decay)
    rounding = torch.Generator(DEVICE).manual_seed(1)
    for scale in (1.0, 0.01):  # states of different magnitudes
        grads = (torch.randn(weights.shape, generator=generator) * scale).bfloat16().to(DEVICE)
        fused_8bit.step(inner, bitsandbytes_state(inner, stand_in), weights, grads, rounding)
    state = inner.state[stand_in]
    before_weights, m, v = weights.float().clone(), dequantized(state, 1), dequantized(state, 2)
    grads = torch.randn(weights.shape, generator=generator).bfloat16().to(DEVICE)
    grads[5], grads[300] = float("nan"), float("inf")

    fused_8bit.step(inner, bitsandbytes_state(inner, stand_in), weights, grads, rounding)

    assert state["step"] == 3
    g = grads.float()
    expected, m, v = adamw_step(before_weights, m, v, g, lr, betas, eps, decay, step=3)
    finite = g.isfinite()
    toward, away = bf16_neighbours(expected[finite])
    stepped = weights.float()[finite]
    assert bool(((stepped == toward) | (stepped == away)).all())
    assert bool((stepped != toward).any()) and bool((stepped != away).any())
    assert torch.equal(weights.float()[~finite], before_weights[~finite])

    m, v = m.where(finite, 0), v.where(finite, 0)
    for key, exact in ((1, m), (2, v)):
        absmax = exact.abs().view(-1, BLOCK).amax(1)
        torch.testing.assert_close(state[f"absmax{key}"], absmax, rtol=1e-6, atol=0)
        scaled = exact / absmax.repeat_interleave(BLOCK)
        qmap = state[f"qmap{key}"]
        nearest = (scaled[:, None] - qmap[None, :]).abs().min(1).values
        chosen = (scaled - qmap[state[f"state{key}"].long()]).abs()
        torch.testing.assert_close(chosen, nearest, rtol=0, atol=1e-7)
    assert bool((dequantized(state, 1)[~finite] == 0).all()) and bool((dequantized(state, 2)[~finite] == 0).all())


def test_compensated_rounding_adds_back_each_weights_error_and_keeps_the_new_one():
    """Compensated (no generator): the step starts from each weight plus its kept rounding error, lands on the bf16
    value nearest the result and keeps what that dropped, so that weight + error hold bitsandbytes' update to about
    16 significant bits; a NaN or inf gradient leaves both."""
    generator = torch.Generator().manual_seed(0)
    weights = (torch.randn(4 * BLOCK, generator=generator) * 0.1).bfloat16().to(DEVICE)
    lr, betas, eps, decay = 1e-5, (0.9, 0.99), 1e-6, 0.05
    inner, stand_in = adamw8bit(weights, lr=lr, betas=betas, eps=eps, weight_decay=decay)
    state = bitsandbytes_state(inner, stand_in)
    state[COMPENSATION] = torch.zeros_like(weights)
    for scale in (1.0, 0.01):
        grads = (torch.randn(weights.shape, generator=generator) * scale).bfloat16().to(DEVICE)
        fused_8bit.step(inner, state, weights, grads, None)
    errors = state[COMPENSATION]
    assert errors.dtype == torch.bfloat16 and bool((errors != 0).any())
    before, m, v = weights.float() + errors.float(), dequantized(state, 1), dequantized(state, 2)
    grads = torch.randn(weights.shape, generator=generator).bfloat16().to(DEVICE)
    grads[5], grads[300] = float("nan"), float("inf")
    kept = errors.clone()

    fused_8bit.step(inner, state, weights, grads, None)

    g = grads.float()
    expected = adamw_step(before, m, v, g, lr, betas, eps, decay, step=3)[0]
    finite = g.isfinite()
    exact, landed = expected[finite], weights.float()[finite]
    toward, away = bf16_neighbours(exact)
    below, above = (exact - toward).abs(), (away - exact).abs()
    ties = (below - above).abs() <= exact.abs() * 2 ** -20  # where fp32's own rounding may pick either
    assert bool(((landed == torch.where(below <= above, toward, away)) | ties).all())
    held = landed + errors.float()[finite]
    assert bool(((held - exact).abs() <= exact.abs() * 2 ** -16).all())
    assert torch.equal(weights.float()[~finite] + errors.float()[~finite], before[~finite])
    assert torch.equal(errors[~finite], kept[~finite])


def test_rounding_is_unbiased_and_replays_from_the_generator():
    """Zero gradients leave Adam's update at 0, so the step is the decay alone: 1.0 * (1 - 2^-11) lies an eighth of
    bf16's spacing below 1 (2^-8), and rounds down to 1 - 2^-8 with probability 1/8. The same generator state rounds
    the same way (a resumed run), another state differently."""
    weights = torch.ones(64 * BLOCK, dtype=torch.bfloat16, device=DEVICE)
    inner, stand_in = adamw8bit(weights, lr=2.0 ** -11, weight_decay=1.0)
    rounding = torch.Generator(DEVICE).manual_seed(7)
    saved = rounding.get_state()
    fused_8bit.step(inner, bitsandbytes_state(inner, stand_in), weights, torch.zeros_like(weights), rounding)
    values = weights.float()
    assert set(values.unique().tolist()) == {1.0 - 2.0 ** -8, 1.0}
    down = (values < 1).float().mean().item()
    assert abs(down - 1 / 8) < 4 * (1 / 8 * 7 / 8 / values.numel()) ** 0.5  # four standard deviations
    assert abs(values.mean().item() - (1 - 2.0 ** -11)) < 2.0 ** -8 * 4 * (7 / 64 / values.numel()) ** 0.5

    def replayed(state) -> torch.Tensor:
        again = torch.ones_like(weights)
        inner, stand_in = adamw8bit(again, lr=2.0 ** -11, weight_decay=1.0)
        generator = torch.Generator(DEVICE)
        generator.set_state(state)
        fused_8bit.step(inner, bitsandbytes_state(inner, stand_in), again, torch.zeros_like(again), generator)
        return again

    assert torch.equal(replayed(saved), weights)
    assert not torch.equal(replayed(rounding.get_state()), weights)


def test_states_are_the_ones_bitsandbytes_steps():
    """The kernel's states are bitsandbytes' layout: its own step continues from them, and three steps of each from
    the same start end near each other (each rounds to nearer codes in its own way)."""
    generator = torch.Generator().manual_seed(3)
    start = (torch.randn(8 * BLOCK, generator=generator) * 0.1).bfloat16().to(DEVICE)
    grads = [torch.randn(start.shape, generator=generator).bfloat16().to(DEVICE) for _ in range(3)]
    ours = start.clone()
    inner, stand_in = adamw8bit(ours, lr=1e-3)
    rounding = torch.Generator(DEVICE).manual_seed(0)
    for grad in grads:
        fused_8bit.step(inner, bitsandbytes_state(inner, stand_in), ours, grad, rounding)

    reference = torch.nn.Parameter(start.float())
    bitsandbytes = bnb.optim.AdamW8bit([reference], lr=1e-3, min_8bit_size=BLOCK)
    for grad in grads:
        reference.grad = grad.float()
        bitsandbytes.step()
    theirs, mine = bitsandbytes.state[reference], inner.state[stand_in]
    for key in (1, 2):  # within a fiftieth of each block's maximum
        bound = 0.02 * theirs[f"absmax{key}"].repeat_interleave(BLOCK)
        assert bool(((dequantized(theirs, key) - dequantized(mine, key)).abs() <= bound).all())
    # the weights moved alike: the same direction, their differences (rounding, codes) a small part of the moves
    theirs_moved, ours_moved = reference.detach() - start.float(), ours.float() - start.float()
    assert torch.nn.functional.cosine_similarity(theirs_moved, ours_moved, dim=0) > 0.97
    assert (theirs_moved - ours_moved).abs().mean() < 0.2 * theirs_moved.abs().mean()

    # bitsandbytes' own step continues from the kernel's states
    continued = torch.nn.Parameter(ours.float())
    after = bnb.optim.AdamW8bit([continued], lr=1e-3, min_8bit_size=BLOCK)
    after.load_state_dict(inner.state_dict())
    continued.grad = grads[0].float()
    after.step()
    assert after.state[continued]["step"] == 4
    assert bool(continued.detach().isfinite().all()) and not torch.equal(continued.detach(), ours.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="training steps bf16 weights in the kernel on CUDA only "
                    "(the tests hide GPUs unless CUDA_VISIBLE_DEVICES is set)")
def test_on_cuda_a_bucket_of_bf16_weights_with_8bit_states_steps_in_the_kernel_and_resumes_exactly():
    """adamw8bit on bf16 weights: the bucket of weights with 8-bit states steps in the kernel (the small ones, with
    32-bit states, in a bucket of their own through bitsandbytes), close to bitsandbytes stepping fp32 weights, also
    after the weights moved to new storage, and a run resumed from the saved optimizer state (the rounding stream's
    included) steps on bit for bit as the uninterrupted one."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 50), (20, 3, 40), (5000,), (33, 129), (7,), (64, 32, 3, 3)]  # 8-bit states from 4096 elements
    start = [(torch.randn(shape, generator=generator) * 0.1).cuda() for shape in shapes]
    grads = [[torch.randn(shape, generator=generator).cuda() for shape in shapes] for _ in range(4)]
    settings = {"unet": OptimizerSettings("adamw8bit", 1e-3, "constant", 0, 10, (0.9, 0.999), 1e-8, 0.01)}

    def optimizers(params, seed):
        return TrainingOptimizers({"unet": torch.nn.ParameterList(params)}, settings,
                                  rounding=torch.Generator("cuda").manual_seed(seed))

    def step(params, opts, step_grads):
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype)
        opts.clip_and_step(None, None)

    ours = [torch.nn.Parameter(t.bfloat16()) for t in start]
    opts = optimizers(ours, seed=1)
    reference = [torch.nn.Parameter(t.bfloat16().float()) for t in start]
    stock = make_optimizer(reference, settings["unet"])
    for number, step_grads in enumerate(grads):
        step(ours, opts, step_grads)
        for p, g in zip(reference, step_grads):
            p.grad = g.bfloat16().float()
        stock.step()
        if number == 1:
            saved, resume_from = copy.deepcopy(opts.state_dicts()), [p.detach().clone() for p in ours]
            for p in ours:  # the weights move, as an EMA kept on the CPU leaves them after its swap
                p.data = p.data.clone()
    buckets = opts.optimizers["unet"].flat_buckets
    eight_bit, small = (tuple(id(p) for p in ours if (p.numel() >= 4096) == kind) for kind in (True, False))
    assert isinstance(buckets[eight_bit], FlatBucket) and buckets[eight_bit].fused_8bit
    assert isinstance(buckets[small], FlatBucket) and not buckets[small].fused_8bit
    moved = torch.cat([(p.detach() - s.bfloat16().float()).flatten() for p, s in zip(reference, start)])
    ours_moved = torch.cat([(p.detach().float() - s.bfloat16().float()).flatten() for p, s in zip(ours, start)])
    assert torch.nn.functional.cosine_similarity(moved, ours_moved, dim=0) > 0.97

    resumed = [torch.nn.Parameter(t.clone()) for t in resume_from]
    again = optimizers(resumed, seed=2)
    again.load_state_dicts(saved)
    for step_grads in grads[2:]:
        step(resumed, again, step_grads)
    assert all(torch.equal(a, b) for a, b in zip(resumed, ours))


def test_the_gather_buffers_hold_memory_only_within_a_step_and_their_views_stay_valid():
    """One pair of buffers serves every optimizer of a run; `release` gives their memory back between steps, and a
    view made before it reads and writes the buffer again once taken back (the kept views of each bucket)."""
    settings = OptimizerSettings("adamw8bit", 1e-3, "constant", 0, 10, (0.9, 0.999), 1e-8, 0.01)
    models = {"unet": torch.nn.Linear(300, 200), "text_encoder": torch.nn.Embedding(1000, 64)}
    opts = TrainingOptimizers(models, {"unet": settings, "text_encoder": settings})
    shared = {id(optimizer.gather_buffers) for optimizer in opts.optimizers.values()}
    assert len(shared) == 1
    assert opts.optimizers["unet"].gather_buffers.elements == 300 * 200 + 200 + 64000 + BLOCK * 3  # all, padded
    large = [torch.empty(BUCKET_ELEMENTS // 2), torch.empty(BUCKET_ELEMENTS // 2), torch.empty(BUCKET_ELEMENTS)]
    assert GatherBuffers.for_params(large).elements == BUCKET_ELEMENTS - 1 + BUCKET_ELEMENTS + BLOCK * 3

    buffers = GatherBuffers(1000)
    bf16 = torch.zeros((), dtype=torch.bfloat16)
    weights, grads = buffers.get(bf16)
    fp32_weights, _ = buffers.get(torch.zeros(()))  # fp32 weights (bitsandbytes') gather into a pair of their own
    assert weights.dtype == torch.bfloat16 and fp32_weights.dtype == torch.float32
    row = weights[10:20].view(2, 5)
    buffers.release()
    assert weights.untyped_storage().size() == 0 and grads.untyped_storage().size() == 0
    assert fp32_weights.untyped_storage().size() == 0
    again = buffers.get(bf16)
    assert again[0] is weights and again[1] is grads
    row.fill_(3)
    assert weights.untyped_storage().size() == 2000 and bool((weights[10:20] == 3).all())


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_a_flat_bucket_follows_weights_moved_to_new_storage(name):
    """A flat bucket keeps views of its weights from step to step; weights given new storage (as an EMA kept on the
    CPU leaves them after its swap) are gathered from there and stepped there, bit for bit as if they had stayed."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 50), (5000,), (7,), (16, 8, 3, 3)]
    start = [torch.randn(shape, generator=generator).bfloat16() for shape in shapes]
    grads = [[torch.randn(shape, generator=generator).bfloat16() for shape in shapes] for _ in range(3)]
    settings = {"unet": OptimizerSettings(name, 1e-3, "constant", 0, 10, (0.9, 0.999), 1e-8, 0.01)}

    def run(move: bool) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opts = TrainingOptimizers({"unet": torch.nn.ParameterList(params)}, settings,
                                  rounding=torch.Generator().manual_seed(1))
        for number, step_grads in enumerate(grads):
            if move and number == 1:
                for p in params:
                    p.data = p.data.clone()
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opts.clip_and_step(None, None)
        return [p.detach() for p in params]

    stayed, moved = run(move=False), run(move=True)
    assert all(torch.equal(a, b) for a, b in zip(stayed, moved))
    assert not any(torch.equal(a, s) for a, s in zip(moved, start))
