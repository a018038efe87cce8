"""Memory means and the memory plan: stochastic rounding, per-parameter stepping, the estimate's formula and the
plan's choice (doc/MEMORY.md)."""
from __future__ import annotations

import copy
import dataclasses
import itertools
from types import SimpleNamespace

import pytest
import torch

from optimizer.optimizers import NonFiniteFusedUpdate, OptimizerSettings, TrainingOptimizers
from optimizer.per_parameter import round_compensated_, round_stochastically_
from tests.conftest import TINY_MODEL, options
from utils.model import shipped
from utils.options.config import ConfigError
from utils.run import memory

GiB = 2 ** 30


def test_stochastic_rounding_picks_a_neighbour_with_the_remainders_probability():
    def rounded(values: torch.Tensor, seed: int) -> torch.Tensor:
        return round_stochastically_(values.clone(), torch.Generator().manual_seed(seed)).to(torch.bfloat16)

    source = torch.full((200_000,), 1.0 + 2 ** -9)  # a quarter of the way from 1.0 to the next bf16 (1 + 2^-7)
    target = rounded(source, 0)
    values = set(target.float().unique().tolist())
    assert values == {1.0, 1.0 + 2 ** -7}
    share_up = (target.float() > 1.0).float().mean().item()
    assert share_up == pytest.approx(0.25, abs=0.005)
    assert target.float().mean().item() == pytest.approx(1.0 + 2 ** -9, abs=2 ** -14)  # unbiased
    assert torch.equal(rounded(-source, 0), -target)  # the magnitude is rounded: symmetric around zero
    assert torch.equal(rounded(source, 0), target)
    exact = torch.tensor([0.5, -3.0, 1024.0])
    assert torch.equal(rounded(exact, 1).float(), exact)  # representable values never move
    in_place = source.clone()
    round_stochastically_(in_place, torch.Generator().manual_seed(0))
    assert torch.equal(in_place.to(torch.bfloat16), target) and torch.equal(in_place, target.float())


def settings(name: str, lr: float = 1e-2) -> dict[str, OptimizerSettings]:
    return {"unet": OptimizerSettings(name, lr, "constant", 0, 10, (0.9, 0.999), 1e-8, 0.01)}


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(TINY_MODEL, subfolder="unet")


def unet_loss(unet, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    channels, cross = unet.config.in_channels, unet.config.cross_attention_dim
    sample = torch.randn(2, channels, 16, 16, generator=g)
    text = torch.randn(2, 7, cross, generator=g).to(next(unet.parameters()).dtype)
    pred = unet(sample.to(text.dtype), torch.tensor([10, 500]), text).sample.float()
    return (pred - sample).square().mean()


def train_steps(unet, optimizers: TrainingOptimizers, steps: int = 2) -> list[dict]:
    norms = []
    for step in range(steps):
        with optimizers.backward_pass(update=True):
            unet_loss(unet, step).backward()
        norms.append(optimizers.clip_and_step(None, None)[0])
    return norms


@pytest.mark.parametrize("name,channels_last", [("adamw", False), ("adamw8bit", False), ("lion", False),
                                                  ("adamw", True), ("adamw8bit", True)])
def test_the_optimizer_step_fused_into_the_backward_pass_gives_the_same_weights(name, channels_last):
    """Each parameter stepped by its own optimizer as its gradient arrives: bit for bit the weights and the logged
    gradient norm of one optimizer stepping all parameters after the backward pass (CPU, fp32). Also with the
    UNet channels-last, as train.py lays it out (bitsandbytes steps contiguous copies of such weights)."""
    unet = tiny_unet()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    fused_unet = copy.deepcopy(unet)
    plain = TrainingOptimizers({"unet": unet}, settings(name))
    fused = TrainingOptimizers({"unet": fused_unet}, settings(name), fused_backward=True)
    plain_norms, fused_norms = train_steps(unet, plain), train_steps(fused_unet, fused)
    if channels_last:  # the layout stays, also where the optimizer steps contiguous tensors only
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in unet.parameters() if p.dim() == 4)
    for a, b in zip(unet.parameters(), fused_unet.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(plain_norms, fused_norms):
        assert torch.allclose(a["unet"], b["unet"], rtol=1e-5)
    assert all(p.grad is None for p in fused_unet.parameters())  # freed as they were used
    # The saved state has the layout of one optimizer: a run resumes with or without the means.
    state = fused.state_dicts()["unet"]
    assert state["state"].keys() == plain.state_dicts()["unet"]["state"].keys()
    again = TrainingOptimizers({"unet": copy.deepcopy(fused_unet)}, settings(name))
    again.load_state_dicts({"unet": state})
    loaded = again.state_dicts()["unet"]["state"][0]
    for key, value in plain.state_dicts()["unet"]["state"][0].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded[key], value), key


def test_lr_schedules_count_the_steps_made_inside_the_backward_pass(recwarn):
    """torch warns that a schedule stepped before its optimizer ("the first value of the learning rate schedule
    is skipped") unless the optimizer's step was called: with fused_backward it is, for the last bucket."""
    unet = tiny_unet()
    opts = TrainingOptimizers({"unet": unet}, settings("adamw"), fused_backward=True)
    train_steps(unet, opts, steps=1)
    opts.step_schedules()
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_grad_accum_with_fused_backward_steps_once_per_window_on_the_summed_gradient():
    unet = tiny_unet()
    fused_unet = copy.deepcopy(unet)
    plain = TrainingOptimizers({"unet": unet}, settings("adamw"))
    fused = TrainingOptimizers({"unet": fused_unet}, settings("adamw"), fused_backward=True)
    for model, opts in ((unet, plain), (fused_unet, fused)):
        with opts.backward_pass(update=False):  # the window's first step: no update
            unet_loss(model, 0).backward()
        with opts.backward_pass(update=True):
            unet_loss(model, 1).backward()
        opts.clip_and_step(None, None)
    assert all(torch.equal(a, b) for a, b in zip(unet.parameters(), fused_unet.parameters()))


def test_bf16_weights_accumulate_updates_smaller_than_their_spacing():
    """lr 1e-4 moves a weight of 1.0 by about 1e-4 a step, far below bf16's spacing there (2^-7 = 0.0078): rounding
    to nearest would never move it; stochastic rounding moves it by the sum of the updates on average."""
    weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opts = TrainingOptimizers({"unet": torch.nn.ParameterList([weight])}, settings("adamw", lr=1e-4),
                              rounding=torch.Generator().manual_seed(0))
    for _ in range(100):
        weight.grad = torch.ones_like(weight)
        opts.clip_and_step(None, None)
    assert weight.dtype == torch.bfloat16
    moved = 1.0 - weight.float().mean().item()  # AdamW moves by about lr per step against the gradient, plus decay
    assert moved == pytest.approx(100 * 1e-4 * (1 + 0.01), rel=0.1)
    rounded = torch.ones(4096, dtype=torch.bfloat16)
    rounded -= 1e-4  # what rounding to nearest does with one such step
    assert torch.equal(rounded, torch.ones(4096, dtype=torch.bfloat16))
    # The state dict carries the rounding stream, so a resumed run rounds as the uninterrupted one would.
    assert "stochastic_rounding" in opts.state_dicts()


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_bf16_weights_end_each_tensor_of_a_bucket_next_to_its_fp32_update(name):
    """Tensors of several shapes and memory layouts step as one bucket (one fp32 copy, one rounding): each bf16
    weight ends on one of the two bf16 values around what the same AdamW step gives in fp32, rounded up about as
    often as the remainder says."""
    shapes = [(64, 50), (700,), (20, 3, 40), (1,), (64, 32, 3, 3)]  # the last one has 8-bit states in adamw8bit

    def random(shape):  # the 4-d tensor (a convolution's weight) channels-last, as train.py lays the UNet out
        values = torch.randn(shape, generator=generator).to(torch.bfloat16)
        return values.to(memory_format=torch.channels_last) if len(shape) == 4 else values

    generator = torch.Generator().manual_seed(0)
    start, grads = [random(shape) for shape in shapes], [random(shape) for shape in shapes]
    bf16 = [torch.nn.Parameter(t.clone()) for t in start]
    fp32 = [torch.nn.Parameter(t.float()) for t in start]
    bucketed = TrainingOptimizers({"unet": torch.nn.ParameterList(bf16)}, settings(name, lr=1e-2),
                                  rounding=torch.Generator().manual_seed(1))
    plain = TrainingOptimizers({"unet": torch.nn.ParameterList(fp32)}, settings(name, lr=1e-2))
    for params, cast in ((bf16, lambda g: g), (fp32, lambda g: g.float())):
        for p, g in zip(params, grads):
            p.grad = cast(g.clone())
    bucketed.clip_and_step(None, None)
    plain.clip_and_step(None, None)
    ups, chances = [], []
    for got, exact in zip(bf16, fp32):
        assert got.dtype == torch.bfloat16 and got.shape == exact.shape
        bits = exact.detach().view(torch.int32)
        toward_zero = (bits & -65536).view(torch.float32)
        away = ((bits & -65536) + 65536).view(torch.float32)
        landed = got.detach().float()
        assert torch.all((landed == toward_zero) | (landed == away))
        ups.append((landed == away).float().flatten())
        chances.append(((bits & 65535).float() / 65536).flatten())
    ups, chances = torch.cat(ups), torch.cat(chances)
    for part in (chances < 0.5, chances >= 0.5):  # rounding to nearest would give 0 and 1 here
        assert ups[part].mean().item() == pytest.approx(chances[part].mean().item(), abs=0.03)


def test_bf16_weights_step_each_bucket_as_one_flat_tensor():
    """A bucket of bf16 weights steps as one fp32 tensor: bit for bit fp32 AdamW on each weight, rounded
    stochastically in the bucket's order; its state is saved per parameter, as one optimizer over them all holds it,
    and a run resumed from it (also with fused_backward, whose buckets follow the backward pass) steps on as the
    uninterrupted one. A weight without a gradient in one step changes the bucket, and then falls a step behind:
    both stay exact."""
    from optimizer.per_parameter import FlatBucket, in_memory_order

    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 50), (700,), (1,), (64, 32, 3, 3)]
    start = [torch.randn(shape, generator=generator).to(torch.bfloat16) for shape in shapes]
    start[3] = start[3].to(memory_format=torch.channels_last)  # as train.py lays convolutions out
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(3)]

    def bf16_params():
        return [torch.nn.Parameter(t.clone()) for t in start]

    def optimizers(params, **options):
        return TrainingOptimizers({"unet": torch.nn.ParameterList(params)}, settings("adamw"), **options)

    def step(params, opts, step_grads):
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.to(p.dtype).to(memory_format=torch.preserve_format)
        opts.clip_and_step(None, None)

    flat = bf16_params()
    opts = optimizers(flat, rounding=torch.Generator().manual_seed(1))
    reference = [torch.nn.Parameter(t.float()) for t in start]
    plain = optimizers(reference)
    rounding = torch.Generator().manual_seed(1)

    def step_both_and_compare(step_grads):
        step(flat, opts, step_grads)
        step(reference, plain, [g if g is None else g.to(torch.bfloat16).float() for g in step_grads])
        stepped = [p for p, g in zip(reference, step_grads) if g is not None]  # the bucket, in its order
        expected = round_stochastically_(torch.cat([in_memory_order(p.detach(), p) for p in stepped]), rounding)
        with torch.no_grad():
            for p, row in zip(stepped, expected.split([p.numel() for p in stepped])):
                in_memory_order(p, p).copy_(row)  # the reference continues from the rounded weights, as bf16 does
        for got, want in zip(flat, reference):
            assert got.dtype == torch.bfloat16 and got.stride() == want.stride() and torch.equal(got.float(), want)

    for step_grads in grads[:2]:
        step_both_and_compare(step_grads)
    assert any(isinstance(b, FlatBucket) for b in opts.optimizers["unet"].flat_buckets.values())
    saved, want = copy.deepcopy(opts.state_dicts()), plain.state_dicts()["unet"]["state"]  # as torch.save would
    assert saved["unet"]["state"].keys() == want.keys()
    for index, state in want.items():
        for key, value in state.items():
            assert torch.equal(saved["unet"]["state"][index][key], value), (index, key)
            assert saved["unet"]["state"][index][key].stride() == value.stride(), (index, key)
    resume_from = [p.detach().clone() for p in flat]

    step_both_and_compare(grads[2])
    for fused_backward in (False, True):
        resumed = bf16_params()
        again = optimizers(resumed, fused_backward=fused_backward, rounding=torch.Generator())
        with torch.no_grad():
            for p, q in zip(resumed, resume_from):
                p.copy_(q)
        again.load_state_dicts(copy.deepcopy(saved))  # each run loads a copy, as from a file
        step(resumed, again, grads[2])
        assert any(isinstance(b, FlatBucket) for b in again.optimizers["unet"].flat_buckets.values())
        if not fused_backward:  # the same bucket, the same rounding draws
            assert all(torch.equal(a, b) for a, b in zip(resumed, flat))
        else:  # buckets in the backward pass's order: the same fp32 step, rounded with other draws
            assert all(torch.allclose(a.float(), b.float(), rtol=2 ** -7, atol=0) for a, b in zip(resumed, flat))

    step_both_and_compare([grads[0][0], None, *grads[0][2:]])  # a bucket of three: its states move there
    step_both_and_compare(grads[1])  # the four again, one a step behind: tensor by tensor
    assert opts.optimizers["unet"].flat_buckets[tuple(map(id, flat))] is None


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_bitsandbytes_steps_flat_buckets_bit_for_bit_as_its_own_step(name):
    """bitsandbytes' optimizers step the weights with 8-bit states as one padded tensor and the small weights (32-bit
    states) as another: bit for bit its own optimizer stepping each tensor, and the same saved state. Also after a
    resume, and when a weight without a gradient in one step changes its bucket and then falls a step behind (tensor
    by tensor)."""
    from optimizer.optimizers import make_optimizer
    from optimizer.per_parameter import FlatBucket

    generator = torch.Generator().manual_seed(0)
    # 8-bit states from 4096 elements on: rows that do and do not fill their last block, and small 32-bit ones.
    shapes = [(64, 50), (700,), (20, 3, 40), (1,), (64, 32, 3, 3), (5000,), (33, 129)]
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    start[4] = start[4].to(memory_format=torch.channels_last)  # as train.py lays convolutions out
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(5)]
    grads[3][1] = None

    def optimizers(params):
        return TrainingOptimizers({"unet": torch.nn.ParameterList(params)}, settings(name))

    def same(got, want, where=()):
        if isinstance(want, dict):
            assert got.keys() == want.keys(), where
            for key in want:
                same(got[key], want[key], (*where, key))
        elif isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), where
        else:
            assert got == want, where

    flat = [torch.nn.Parameter(t.clone()) for t in start]
    opts = optimizers(flat)
    eight_bit, small = (tuple(id(p) for p in flat if (p.numel() >= 4096) == kind) for kind in (True, False))
    reference = [torch.nn.Parameter(t.contiguous()) for t in start]
    stock = make_optimizer(reference, settings(name)["unet"])
    for number, step_grads in enumerate(grads):
        for params in (flat, reference):
            for p, g in zip(params, step_grads):
                p.grad = None if g is None else g.clone()
        opts.clip_and_step(None, None)
        stock.step()
        stock.zero_grad()
        assert all(torch.equal(a, b) for a, b in zip(flat, reference)), number
        assert flat[4].is_contiguous(memory_format=torch.channels_last)
        if number == 1:
            assert all(isinstance(opts.optimizers["unet"].flat_buckets[key], FlatBucket) for key in (eight_bit, small))
            saved = copy.deepcopy(opts.state_dicts())
            same(saved["unet"]["state"], stock.state_dict()["state"])
            resumed = [torch.nn.Parameter(p.detach().clone()) for p in flat]
            again = optimizers(resumed)
            again.load_state_dicts(saved)
    assert opts.optimizers["unet"].flat_buckets[small] is None  # one weight a step behind: tensor by tensor
    assert isinstance(opts.optimizers["unet"].flat_buckets[eight_bit], FlatBucket)
    same(opts.state_dicts()["unet"]["state"], stock.state_dict()["state"])
    for step_grads in grads[2:]:
        for p, g in zip(resumed, step_grads):
            p.grad = None if g is None else g.clone()
        again.clip_and_step(None, None)
    assert all(torch.equal(a, b) for a, b in zip(resumed, flat))


def test_compensated_rounding_keeps_what_rounding_to_nearest_drops():
    """The weight becomes its nearest bf16 value; the compensation holds the dropped part (exact in fp32) rounded to
    bf16, so weight + compensation hold the fp32 value to about 16 significant bits."""
    values = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 0.05
    compensation = torch.empty(values.shape, dtype=torch.bfloat16)
    rounded = round_compensated_(values.clone(), compensation)
    assert torch.equal(rounded, values.to(torch.bfloat16).float())
    assert torch.equal(compensation, (values - rounded).to(torch.bfloat16))
    assert bool(((rounded + compensation.float() - values).abs() <= values.abs() * 2 ** -16).all())


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_compensated_bf16_weights_follow_the_fp32_run_where_stochastic_rounding_wanders(name):
    """Updates of about 1e-5 to weights of about 0.05 (bf16's spacing there: 2^-12, 24 updates' worth): with
    compensated rounding each weight plus its kept error follows the same optimizer on fp32 weights to within the
    compensation's own rounding (at most 2^-9 of its size per step), with no random numbers drawn; the
    same run with stochastic rounding is only right on average. Tensor by tensor (a weight without a gradient in one
    step leaves its bucket, then steps a step behind) as in flat buckets; a checkpoint of it resumes bit for bit,
    the errors saved per parameter in bf16, and loads into a run without them."""
    from optimizer.per_parameter import COMPENSATION, FlatBucket

    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 80), (700,), (33, 129), (16, 8, 3, 3)]
    start = [torch.randn(shape, generator=generator) * 0.05 for shape in shapes]
    start[3] = start[3].to(memory_format=torch.channels_last)  # as train.py lays convolutions out
    start = [t.bfloat16().float() for t in start]
    steps = 12
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(steps)]
    grads[5][1] = None

    def run(params, opts, step_grads):
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.to(p.dtype)
        opts.clip_and_step(None, None)

    def optimizers(params, rounding):
        return TrainingOptimizers({"unet": torch.nn.ParameterList(params)}, settings(name, lr=1e-5),
                                  rounding=rounding)

    compensated = [torch.nn.Parameter(t.bfloat16()) for t in start]
    stochastic = [torch.nn.Parameter(t.bfloat16()) for t in start]
    reference = [torch.nn.Parameter(t.clone()) for t in start]
    opts, noisy = optimizers(compensated, None), optimizers(stochastic, torch.Generator().manual_seed(1))
    plain = optimizers(reference, None)
    for number, step_grads in enumerate(grads):
        for params, o in ((compensated, opts), (stochastic, noisy), (reference, plain)):
            run(params, o, step_grads)
        if number == 2:
            buckets = opts.optimizers["unet"].flat_buckets
            assert any(isinstance(b, FlatBucket) for b in buckets.values())
            saved, resume_from = copy.deepcopy(opts.state_dicts()), [p.detach().clone() for p in compensated]
    assert None in opts.optimizers["unet"].flat_buckets.values()  # one a step behind: tensor by tensor

    errors = opts.state_dicts()["unet"]["state"]
    # A kept error is at most half bf16's spacing (2^-8 of the weight), and bf16 keeps it to 2^-9 of itself.
    bound = steps * max(p.detach().abs().max().item() for p in reference) * 2.0 ** -17
    for index, (p, want) in enumerate(zip(compensated, reference)):
        error = errors[index][COMPENSATION]
        assert p.dtype == error.dtype == torch.bfloat16 and error.shape == p.shape
        assert (p.detach().float() + error.float() - want.detach()).abs().max().item() <= bound
    wandered = max((p.detach().float() - want.detach()).abs().max().item() for p, want in zip(stochastic, reference))
    assert wandered >= 2.0 ** -13 > bound  # half the spacing at 0.05

    assert all(value[COMPENSATION].dtype == torch.bfloat16 for value in saved["unet"]["state"].values())
    resumed = [torch.nn.Parameter(t.clone()) for t in resume_from]
    again = optimizers(resumed, None)
    again.load_state_dicts(copy.deepcopy(saved))
    for step_grads in grads[3:]:
        run(resumed, again, step_grads)
    assert all(torch.equal(a, b) for a, b in zip(resumed, compensated))
    fp32 = optimizers([torch.nn.Parameter(t.float()) for t in resume_from], None)
    fp32.load_state_dicts(copy.deepcopy(saved))
    assert all(COMPENSATION not in value for value in fp32.state_dicts()["unet"]["state"].values())


def test_a_non_finite_gradient_with_fused_backward_stops_the_update():
    unet = tiny_unet()
    opts = TrainingOptimizers({"unet": unet}, settings("adamw"), fused_backward=True)
    with opts.backward_pass(update=True):
        (unet_loss(unet, 0) * float("inf")).backward()
    with pytest.raises(NonFiniteFusedUpdate, match="could not be skipped"):
        opts.clip_and_step(None, None)


@pytest.mark.parametrize("name", ["prodigy", "dadapt_adam"])
def test_optimizers_with_a_global_step_size_refuse_per_parameter_steps(name):
    with pytest.raises(ConfigError, match=f"'{name}' computes its step size from all of them together"):
        TrainingOptimizers({"unet": torch.nn.Linear(2, 2)}, settings(name), fused_backward=True)


def test_the_unets_norms_run_in_bf16_under_bf16_autocast_and_as_before_without():
    """prepare_models gives the UNet's GroupNorm and LayerNorm a bf16 forward (utils/model/norms.py): under bf16
    autocast it returns their fp32 normalization rounded to bf16, without autocast torch's own computation."""
    from accelerate import Accelerator

    from utils.model.models import load
    from utils.run.setup import prepare_models

    model, stock = load(TINY_MODEL), tiny_unet()
    unet = prepare_models(model, options("--vram", "off", "--no-channels_last"), Accelerator(cpu=True))["unet"]
    kinds = [type(m).__name__ for m in unet.modules()]
    assert "GroupNorm" not in kinds and "LayerNorm" not in kinds
    assert {"Bf16GroupNorm", "Bf16LayerNorm"} <= set(kinds)
    assert unet.state_dict().keys() == stock.state_dict().keys()
    assert torch.equal(unet_loss(unet, 0), unet_loss(stock, 0))

    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    group = next(m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm))
    layer = next(m for m in unet.modules() if isinstance(m, torch.nn.LayerNorm))
    for norm, x, exact in (
            (group, torch.randn(2, group.num_channels, 4, 4, generator=g),
             lambda v: F.group_norm(v, group.num_groups, group.weight, group.bias, group.eps)),
            (layer, torch.randn(2, 7, *layer.normalized_shape, generator=g),
             lambda v: F.layer_norm(v, layer.normalized_shape, layer.weight, layer.bias, layer.eps))):
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=g)
            norm.bias.uniform_(-0.5, 0.5, generator=g)
        x = x.bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(x)
        assert out.dtype == torch.bfloat16
        expected = exact(x.float())
        assert ((out.float() - expected).abs() <= expected.abs() * 2 ** -7 + 2 ** -7).all()  # within bf16 rounding
        out.float().square().sum().backward()
        assert norm.weight.grad.dtype == torch.float32 and norm.weight.grad.abs().sum() > 0


def test_partial_checkpointing_recomputes_the_highest_resolution_blocks_to_the_same_gradients():
    from utils.run.setup import checkpoint_highest_resolution

    def kept_and_gradients(unet) -> tuple[int, list[torch.Tensor]]:
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            loss = unet_loss(unet, 0)
        loss.backward()
        return sum(kept), [p.grad for p in unet.parameters()]

    none, partial, full = tiny_unet(), tiny_unet(), tiny_unet()
    checkpoint_highest_resolution(partial)
    full.enable_gradient_checkpointing()
    checkpointed = {name for name, m in partial.named_modules() if getattr(m, "gradient_checkpointing", False)}
    assert checkpointed and all(name.startswith(("down_blocks.0", f"up_blocks.{len(partial.up_blocks) - 1}"))
                                for name in checkpointed)
    attention = tiny_unet()
    checkpoint_highest_resolution(attention, attention_only=True)
    checkpointed_attention = {name for name, m in attention.named_modules() if getattr(m, "gradient_checkpointing",
                                                                                         False)}
    assert checkpointed_attention and all(
        type(m).__name__ == "Transformer2DModel" for name, m in attention.named_modules()
        if name in checkpointed_attention) and checkpointed_attention < checkpointed
    kept_none, grads_none = kept_and_gradients(none)
    kept_attention, grads_attention = kept_and_gradients(attention)
    kept_partial, grads_partial = kept_and_gradients(partial)
    kept_full, grads_full = kept_and_gradients(full)
    # what the forward keeps for the backward pass, in elements
    assert kept_none > kept_attention > kept_partial > kept_full
    for grads in (grads_attention, grads_partial, grads_full):
        assert all(torch.equal(a, b) for a, b in zip(grads_none, grads))


def test_partial_and_attention_checkpointing_also_checkpoint_a_trained_text_encoder_to_the_same_gradients():
    from accelerate import Accelerator

    from utils.model.models import load
    from utils.run.setup import prepare_models

    def prepared(*flags):
        model = load(TINY_MODEL)
        prepare_models(model, options("--vram", "off", "--no-channels_last", *flags), Accelerator(cpu=True))
        return model.text_encoder

    def kept_and_gradients(text_encoder) -> tuple[int, list[torch.Tensor]]:
        kept = []
        ids = torch.randint(0, text_encoder.config.vocab_size, (2, text_encoder.config.max_position_embeddings),
                            generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            out = text_encoder(ids)[0]
        out.square().mean().backward()
        return sum(kept), [p.grad for p in text_encoder.parameters()]

    plain, partial = prepared(), prepared("--partial_checkpointing")
    assert not plain.is_activation_checkpointing and partial.is_activation_checkpointing
    assert prepared("--attention_checkpointing").is_activation_checkpointing
    assert not prepared("--partial_checkpointing", "--disable_textenc_training").is_activation_checkpointing
    kept_plain, grads_plain = kept_and_gradients(plain)
    kept_partial, grads_partial = kept_and_gradients(partial)
    assert kept_partial < kept_plain / 2
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_partial))


@pytest.mark.parametrize("kind", ["sd15", "sd2-v"])
def test_the_text_encoder_keeps_what_the_estimate_counts_per_token_width_and_layer(kind):
    """What autograd keeps of a trained text encoder's forward under bf16 autocast, counted on the real SD text
    encoders: the batch's share (two captions less one), which excludes autocast's bf16 weight copies."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils.model.models import read_configs

    size = memory.model_size(shipped.config_dir(kind))
    text_encoder = CLIPTextModel(CLIPTextConfig(**read_configs(shipped.config_dir(kind))["text_encoder"]))

    def kept_bytes(batch: int) -> int:
        storages = {}

        def keep(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 49406, (batch, size.text_length), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            text_encoder(ids)
        return sum(storages.values())

    per_unit = (kept_bytes(2) - kept_bytes(1)) / (size.text_length * size.text_encoder_width * size.text_encoder_layers)
    assert 0.8 * memory.ACTIVATIONS.text_encoder <= per_unit <= memory.ACTIVATIONS.text_encoder, per_unit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's autocast is the one that runs norms in fp32 "
                    "(the tests hide GPUs unless CUDA_VISIBLE_DEVICES is set)")
def test_on_cuda_the_norms_keep_no_fp32_activation_for_the_backward_pass():
    from utils.model.norms import Bf16GroupNorm, Bf16LayerNorm

    def fp32_activations_kept(norm, x) -> int:
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t), \
                torch.autocast("cuda", dtype=torch.bfloat16):
            torch.nn.functional.silu(norm(x)).sum()
        return sum(t.dtype == torch.float32 and t.numel() == x.numel() for t in kept)

    x = torch.randn(2, 64, 16, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    stock, ours = torch.nn.GroupNorm(8, 64).cuda(), Bf16GroupNorm(8, 64).cuda()
    assert fp32_activations_kept(stock, x) > 0 and fp32_activations_kept(ours, x) == 0
    tokens = torch.randn(2, 77, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    stock, ours = torch.nn.LayerNorm(64).cuda(), Bf16LayerNorm(64).cuda()
    assert fp32_activations_kept(stock, tokens) > 0 and fp32_activations_kept(ours, tokens) == 0


SD15 = memory.ModelSize(unet=859_520_964, text_encoder=123_060_480, vae=83_653_863, unet_channels=320, vae_scale=8,
                        text_length=77, text_encoder_width=768, text_encoder_layers=12)


def work(**changes) -> memory.Workload:
    base = dict(batch_size=8, pixels=512 * 512, trained=("unet", "text_encoder"),
                optimizers={"unet": "adamw", "text_encoder": "adamw"}, mixed_precision=True, cache_latents=True,
                ema_on_gpu=False, sample_batch=4, validation_batch=0, vae_slicing=True)
    return memory.Workload(**{**base, **changes})


def test_model_size_is_counted_from_the_configs_without_weights():
    assert memory.model_size(shipped.config_dir("sd15")) == SD15  # a folder of configs only
    tiny = memory.model_size(TINY_MODEL)
    from utils.model.models import load
    model = load(TINY_MODEL)
    assert tiny.unet == sum(p.numel() for p in model.unet.parameters())
    assert tiny.text_encoder == sum(p.numel() for p in model.text_encoder.parameters())


def test_the_estimate_adds_bytes_per_parameter_of_each_means():
    a = memory.ACTIVATIONS
    n = SD15.unet + SD15.text_encoder
    per_image = 64 * 64 * 320  # latent pixels x the UNet's first channels, at 512 px
    plain = memory.estimate(SD15, memory.Means(), work())
    parts = plain.parts
    assert parts["trained weights"] == 4 * n and parts["optimizer states"] == 8 * n and parts["VAE"] == 2 * SD15.vae
    assert plain.moment == "backward pass"  # it starts with every activation and autocast's bf16 weight copies
    text = 8 * 77 * 768 * 12 * a.text_encoder  # a trained text encoder's activations, per token x width x layer
    assert parts["activations and autocast weight copies"] == 8 * per_image * a.training + text + 2 * n
    partial = memory.estimate(SD15, memory.Means(partial_checkpointing=True), work()).parts
    assert partial["activations and autocast weight copies"] == 8 * per_image * a.partial + 2 * n  # both checkpointed
    attention = memory.estimate(SD15, memory.Means(attention_checkpointing=True), work()).parts
    assert attention["activations and autocast weight copies"] == 8 * per_image * a.attention + 2 * n
    assert a.partial < a.attention < a.training
    for covering in (memory.Means(partial_checkpointing=True), memory.Means(gradient_checkpointing=True)):
        assert memory.estimate(SD15, dataclasses.replace(covering, attention_checkpointing=True), work()) == \
            memory.estimate(SD15, covering, work())
    frozen_te = memory.estimate(SD15, memory.Means(), work(trained=("unet",))).parts
    assert frozen_te["activations and autocast weight copies"] == 8 * per_image * a.training + 2 * SD15.unet
    both = memory.Means(gradient_checkpointing=True, partial_checkpointing=True)  # full checkpointing covers partial
    assert memory.estimate(SD15, both, work()) == memory.estimate(SD15, memory.Means(gradient_checkpointing=True),
                                                                  work())
    assert plain.peak == sum(parts.values())
    lean = memory.estimate(SD15, memory.Means(True, True, True, True), work(sample_batch=0))
    assert lean.parts["trained weights"] == 2 * n and lean.parts["optimizer states"] == 2 * n
    assert lean.parts["recomputed block"] == 8 * per_image * a.recompute
    assert lean.parts["kept block inputs or gradients"] == max(8 * per_image * a.boundaries,
                                                               memory.BUCKET_ELEMENTS * 12)
    checkpointed = memory.estimate(SD15, memory.Means(gradient_checkpointing=True), work(batch_size=1)).parts
    assert checkpointed["kept block inputs or gradients"] == 4 * n  # the gradients outgrow one image's block inputs
    assert frozen_te["frozen weights"] == 2 * SD15.text_encoder and frozen_te["optimizer states"] == 8 * SD15.unet
    assert memory.estimate(SD15, memory.Means(), work(ema_on_gpu=True)).parts["EMA"] == 4 * n
    accumulating = memory.estimate(SD15, memory.Means(), work(grad_accum=2)).parts
    assert accumulating["gradients of the window"] == 4 * n


def test_the_vae_moments_encode_and_decode_one_image_at_a_time_under_a_plan():
    a = memory.ACTIVATIONS
    lean = memory.Means(True, True, True, True)
    one = memory.estimate(SD15, lean, work(batch_size=1, sample_batch=4, cache_latents=True))
    assert one.moment == "samples"
    assert one.parts["VAE decoding"] == 512 * 512 * a.vae_decode
    whole_batch = memory.estimate(SD15, lean, work(batch_size=1, sample_batch=4, vae_slicing=False))
    assert whole_batch.parts["VAE decoding"] == 4 * 512 * 512 * a.vae_decode
    narrow_unet = dataclasses.replace(SD15, unet_channels=32)  # activations small next to the VAE's
    no_cache = memory.estimate(narrow_unet, lean, work(batch_size=8, sample_batch=0, cache_latents=False,
                                                       vae_slicing=False))
    assert no_cache.moment == "VAE encoding" and no_cache.parts["VAE encoding"] == 8 * 512 * 512 * a.vae_encode
    filling = memory.estimate(narrow_unet, lean, work(batch_size=8, sample_batch=0))
    assert filling.moment == "latent cache filling" and filling.parts["VAE encoding"] == 512 * 512 * a.vae_encode


def plan_args(**set_in_file):
    sources = {key: "train.json" for key in set_in_file}
    defaults = dict(grad_accum=1, clip_grad_norm=None, mixed_precision="auto", fused_backward=False,
                    gradient_checkpointing=False, bf16_weights=False, bf16_rounding="auto")
    return SimpleNamespace(**{**defaults, **set_in_file}, sources=sources)


# Peak reserved GiB of whole runs (cache filling, steps, a sample pass, validation) measured by scripts/bench.py on
# H200s, doc/PERFORMANCE.md runs M, Q and R (partial checkpointing, which checkpoints the text encoder since run Q,
# and attention checkpointing): the plans `auto` picked under the caps, cfgs/train.json otherwise (one sample prompt
# at a time, validation at the training batch).
MEASURED_PEAKS = [
    ("sd15", 512, 8, memory.Means(), 20.72),
    ("sd15", 512, 8, memory.Means(partial_checkpointing=True), 17.50),
    ("sd15", 512, 8, memory.Means(attention_checkpointing=True), 18.28),
    ("sd15", 512, 8, memory.Means(bf16_weights=True, attention_checkpointing=True), 14.79),
    ("sd15", 512, 8, memory.Means(eight_bit_states=True, bf16_weights=True, attention_checkpointing=True), 9.34),
    ("sd15", 512, 8, memory.Means(eight_bit_states=True, bf16_weights=True), 11.73),
    ("sd15", 512, 8, memory.Means(eight_bit_states=True, bf16_weights=True, partial_checkpointing=True), 8.55),
    ("sd15", 512, 8, memory.Means(eight_bit_states=True, bf16_weights=True, gradient_checkpointing=True), 6.76),
    ("sd15", 512, 4, memory.Means(True, True, True, True), 5.10),
    ("sd2-v", 768, 8, memory.Means(eight_bit_states=True, bf16_weights=True), 21.67),
    ("sd2-v", 768, 8, memory.Means(eight_bit_states=True, bf16_weights=True, gradient_checkpointing=True), 9.21),
    ("sd2-v", 768, 8, memory.Means(eight_bit_states=True, bf16_weights=True, partial_checkpointing=True), 14.89),
    ("sd2-v", 768, 2, memory.Means(True, True, True, True), 6.88),
    ("sd2-v", 768, 1, memory.Means(fused_backward=True, eight_bit_states=True, bf16_weights=True), 7.02),
]


@pytest.mark.parametrize("kind, resolution, batch, means, measured_gib", MEASURED_PEAKS)
def test_the_estimate_is_within_ten_percent_of_the_measured_peak(kind, resolution, batch, means, measured_gib):
    run = work(batch_size=batch, pixels=resolution * resolution, sample_batch=1, validation_batch=batch)
    estimate = memory.estimate(memory.model_size(shipped.config_dir(kind)), means, run).peak / GiB
    assert abs(estimate - measured_gib) <= 0.1 * measured_gib, (estimate, measured_gib)


ALL_MEANS = [memory.Means(*flags) for flags in itertools.product((False, True), repeat=6)]


@pytest.mark.parametrize("card_gib", [80, 24, 16, 12, 8])
def test_the_plan_takes_the_fastest_means_that_fit(card_gib):
    plan = memory.choose(SD15, work(batch_size=2), card_gib * GiB, plan_args())
    assert plan.estimate.peak <= plan.budget < card_gib * GiB
    assert plan.budget == card_gib * GiB - max(memory.SAFETY_MARGIN * card_gib * GiB, memory.MIN_MARGIN_GIB * GiB)
    faster = [m for m in ALL_MEANS if memory.slowdown(m) < memory.slowdown(plan.means)]
    assert all(memory.estimate(SD15, m, work(batch_size=2)).peak > plan.budget for m in faster)
    if card_gib == 80:
        assert plan.means == memory.Means()


def test_the_plan_pairs_bf16_weights_with_fused_backward_where_the_options_allow():
    """bf16_weights' copies and rounding cost host time that the backward pass hides (fused_backward); apart, the
    plan ranks them by their own slowdowns."""
    paired = memory.choose(SD15, work(batch_size=8), 20 * GiB, plan_args())
    assert paired.means == memory.Means(fused_backward=True, bf16_weights=True)
    assert memory.slowdown(paired.means) < memory.slowdown(memory.Means(bf16_weights=True))
    clipped = memory.choose(SD15, work(batch_size=8), 20 * GiB, plan_args(clip_grad_norm=1.0))
    assert not clipped.means.fused_backward and clipped.means != memory.Means()
    assert memory.estimate(SD15, clipped.means, work(batch_size=8)).peak <= clipped.budget


def test_the_slowdown_of_bf16_weights_inside_the_backward_pass_depends_on_checkpointing():
    """Inside a backward pass without checkpointing the host is free to do bf16_weights' work; with checkpointing it
    also reruns the forward of the checkpointed blocks (run K)."""
    fused_bf16 = memory.Means(fused_backward=True, bf16_weights=True)
    assert memory.slowdown(fused_bf16) == memory.SLOWDOWN["fused_backward"]
    for checkpointing in ("gradient_checkpointing", "partial_checkpointing", "attention_checkpointing"):
        means = dataclasses.replace(fused_bf16, **{checkpointing: True})
        assert memory.slowdown(means) == pytest.approx(memory.SLOWDOWN["fused_backward"] * memory.SLOWDOWN[
            checkpointing] * memory.SLOWDOWN_IN_CHECKPOINTED_FUSED_BACKWARD["bf16_weights"])
    full, partial = memory.Means(gradient_checkpointing=True), memory.Means(partial_checkpointing=True)
    assert memory.slowdown(dataclasses.replace(full, partial_checkpointing=True)) == memory.slowdown(full)
    for covering in (full, partial):
        assert memory.slowdown(dataclasses.replace(covering, attention_checkpointing=True)) == \
            memory.slowdown(covering)
    for card_gib in (16, 12, 8):
        means = memory.choose(SD15, work(), card_gib * GiB, plan_args()).means
        assert sum((means.gradient_checkpointing, means.partial_checkpointing, means.attention_checkpointing)) <= 1


def test_the_plan_checkpoints_as_little_as_fits():
    """Checkpointing the top transformer blocks alone costs less than the top blocks whole, which cost less than
    every block: the plan takes the first that fits (SD1.5 under 12 GiB, SD2.1-768 under 16 and 12 GiB)."""
    sd2 = memory.model_size(shipped.config_dir("sd2-v"))
    at_768 = dict(pixels=768 * 768)
    lean = memory.Means(eight_bit_states=True, bf16_weights=True)
    for size, card_gib, changes, checkpointing in ((SD15, 12, {}, "attention_checkpointing"),
                                                   (sd2, 16, at_768, "partial_checkpointing"),
                                                   (sd2, 12, at_768, "gradient_checkpointing")):
        assert memory.choose(size, work(**changes), card_gib * GiB, plan_args(bf16_rounding="stochastic")).means == \
            dataclasses.replace(lean, **{checkpointing: True}), (card_gib, checkpointing)


def test_eight_bit_states_cost_little_on_top_of_bf16_weights():
    """Both step the weights through copies in flat buckets: with bf16 weights, 8-bit states add only their own
    kernels (run L), so on a 16 GB card the plan takes the two rather than checkpointing part of the UNet."""
    eight_bit, bf16 = memory.Means(eight_bit_states=True), memory.Means(bf16_weights=True)
    both = memory.Means(eight_bit_states=True, bf16_weights=True)
    assert memory.slowdown(eight_bit) == memory.SLOWDOWN["eight_bit_states"]
    assert memory.slowdown(both) == pytest.approx(
        memory.SLOWDOWN["bf16_weights"] * memory.SLOWDOWN_WITH_BF16_WEIGHTS["eight_bit_states"])
    assert memory.slowdown(both) < memory.slowdown(memory.Means(bf16_weights=True, partial_checkpointing=True))
    assert memory.choose(SD15, work(), 16 * GiB, plan_args(bf16_rounding="stochastic")).means == both


def test_bf16_weights_round_compensated_where_the_plan_has_room_to_spare():
    """bf16_rounding auto: the plan keeps each bf16 weight's rounding error (2 bytes per trained parameter) where that
    fits with the estimate's own error to spare, and rounds stochastically where it does not; compensated, set by the
    user, is counted in every plan it weighs; stochastic is never upgraded. The plan sets the option it chose."""
    roomy_args = plan_args(bf16_weights=True, vram=80)
    roomy = memory.plan_run(roomy_args, SD15, work(), "cuda")
    assert roomy.means.compensated_rounding and roomy_args.bf16_rounding == "compensated"
    assert roomy.estimate.parts["rounding errors"] == (SD15.unet + SD15.text_encoder) * 2
    assert "bf16_weights on (compensated rounding)" in roomy.lines()[0]
    tight_args = plan_args(vram=12)
    tight = memory.plan_run(tight_args, SD15, work(), "cuda")
    assert tight.means.bf16_weights and not tight.means.compensated_rounding
    assert tight_args.bf16_rounding == "stochastic" and "bf16_weights on (stochastic rounding)" in tight.lines()[0]
    upgraded = memory.estimate(SD15, dataclasses.replace(tight.means, compensated_rounding=True), work()).peak
    assert upgraded <= tight.budget < upgraded * (1 + memory.ESTIMATE_ERROR)  # it would fit, without that to spare
    chosen = memory.choose(SD15, work(), 12 * GiB, plan_args(bf16_rounding="compensated"))
    assert chosen.means == dataclasses.replace(tight.means, compensated_rounding=True)  # the user's call: it fits
    assert chosen.estimate.peak <= chosen.budget
    with pytest.raises(ConfigError, match=r"bf16_weights on \(compensated rounding\)"):  # not even the leanest
        memory.choose(SD15, work(), 8 * GiB, plan_args(bf16_rounding="compensated"))
    assert memory.choose(SD15, work(), 8 * GiB, plan_args()).means.bf16_weights
    never = memory.choose(SD15, work(), 80 * GiB, plan_args(bf16_weights=True, bf16_rounding="stochastic"))
    assert never.means.bf16_weights and not never.means.compensated_rounding


def test_the_plan_keeps_the_means_the_user_set_and_what_the_options_rule_out():
    kept_off = memory.choose(SD15, work(), 16 * GiB, plan_args(gradient_checkpointing=False))
    assert not kept_off.means.gradient_checkpointing and kept_off.fixed == ("gradient_checkpointing",)
    kept_on = memory.choose(SD15, work(), 80 * GiB, plan_args(bf16_weights=True))
    # the faster way to run it, rounding compensated (room for it)
    assert kept_on.means == memory.Means(fused_backward=True, bf16_weights=True, compensated_rounding=True)
    for options in (dict(clip_grad_norm=1.0), dict(grad_accum=2)):
        assert not memory.choose(SD15, work(), 12 * GiB, plan_args(**options)).means.fused_backward
    assert not memory.choose(SD15, work(), 12 * GiB, plan_args(), processes=2).means.fused_backward
    eight_bit = work(optimizers={"unet": "adamw8bit", "text_encoder": "adamw8bit"})
    plan = memory.choose(SD15, eight_bit, 12 * GiB, plan_args())
    assert not plan.means.eight_bit_states and plan.optimizers == {"unet": "adamw8bit", "text_encoder": "adamw8bit"}
    switched = memory.choose(SD15, work(), 12 * GiB, plan_args())
    assert switched.means.eight_bit_states and switched.optimizers["unet"] == "adamw8bit"
    assert "eight_bit_states on" in switched.lines()[0] and "optimizers unet adamw8bit" in switched.lines()[0]


def test_a_run_that_cannot_fit_says_which_batch_would():
    with pytest.raises(ConfigError) as error:
        memory.choose(SD15, work(batch_size=32), 6 * GiB, plan_args())
    message = str(error.value)
    assert "vram: 6.0 GiB cannot hold this run" in message and "batch_size" in message
    fitting = int(message.split("Lower batch_size to ")[1].split(",")[0])
    lean = memory.Means(True, True, True, True)
    assert memory.estimate(SD15, lean, work(batch_size=fitting)).peak <= 6 * GiB
    assert memory.estimate(SD15, lean, work(batch_size=fitting + 1)).peak > memory.choose(
        SD15, work(batch_size=fitting), 6 * GiB, plan_args()).budget
