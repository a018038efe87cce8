"""Each optimizer's updates against its published formulas, written out independently here.

The optimizers run on two parameter tensors; each reference runs on one flat float64 vector (the two
concatenated), so the sums over all parameters that D-Adaptation and Prodigy take are checked too. Gradients
come from a noisy quadratic evaluated at each side's own weights, so a wrong step changes every later one.
"""
from __future__ import annotations

import math

import pytest
import torch

from optimizer.adacoor import AdaCoor
from optimizer.lr_free import DAdaptAdam, DAdaptLion, DAdaptSGD, Prodigy

SHAPES = ((6, 5), (7,))
SIZE = sum(math.prod(shape) for shape in SHAPES)
STEPS = 40


def problem(seed: int = 0):
    """Start point, curvature, minimum and per-step gradient noise of a quadratic on SIZE weights."""
    generator = torch.Generator().manual_seed(seed)
    # Small start weights keep float32 rounding of the weights far below the first steps (about d0).
    start = torch.randn(SIZE, generator=generator, dtype=torch.float64) * 1e-3
    curvature = torch.rand(SIZE, generator=generator, dtype=torch.float64) * 2 + 0.1
    minimum = torch.randn(SIZE, generator=generator, dtype=torch.float64)
    noise = torch.randn(STEPS, SIZE, generator=generator, dtype=torch.float64) * 0.1
    return start, lambda x, k: curvature * (x - minimum) + noise[k]


def run_optimizer(make, steps: int = STEPS, seed: int = 0):
    """The optimizer under test on the split weights; returns the flat weights after each step, and d."""
    start, gradient = problem(seed)
    params = [torch.nn.Parameter(part.reshape(shape).float().clone())
              for part, shape in zip(start.split([math.prod(s) for s in SHAPES]), SHAPES)]
    optimizer = make(params)
    trajectory, ds = [], []
    for k in range(steps):
        flat = torch.cat([p.detach().flatten() for p in params]).double()
        for p, g in zip(params, gradient(flat, k).split([p.numel() for p in params])):
            p.grad = g.reshape(p.shape).float()
        optimizer.step()
        trajectory.append(torch.cat([p.detach().flatten() for p in params]).double())
        ds.append(float(optimizer.param_groups[0].get("d", math.nan)))
    return start, trajectory, ds


def assert_same_path(start, trajectory, reference):
    """Compares displacements from the start, to float32 precision: relative to each weight's displacement,
    and to the largest one for weights that pass back over their start."""
    for k, (got, want) in enumerate(zip(trajectory, reference)):
        scale = (want - start).abs().max().item()
        error = ((got - want).abs() - 2e-4 * (want - start).abs()).max().item()
        assert error <= 2e-5 * scale, f"step {k}: off by {error:.3g} where steps reach {scale:.3g}"


def test_lion_is_bitsandbytes_lion_32bit_and_matches_the_formula():
    import bitsandbytes

    lr, (beta1, beta2), wd = 0.01, (0.9, 0.99), 0.1
    start, trajectory, _ = run_optimizer(lambda params: bitsandbytes.optim.Lion(
        params, lr=lr, betas=(beta1, beta2), weight_decay=wd, optim_bits=32))
    _, gradient = problem()
    x, m, reference = start.clone(), torch.zeros(SIZE, dtype=torch.float64), []
    for k in range(STEPS):
        g = gradient(x, k)
        c = beta1 * m + (1 - beta1) * g
        x = x - lr * (torch.sign(c) + wd * x)
        m = beta2 * m + (1 - beta2) * g
        reference.append(x)
    assert_same_path(start, trajectory, reference)


def test_lion8bit_follows_the_lion_formula_up_to_its_quantized_momentum():
    import bitsandbytes

    lr, (beta1, beta2), wd, n = 0.01, (0.9, 0.99), 0.1, 8192  # big enough for the 8-bit path
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(n, generator=generator)
    grads = torch.randn(5, n, generator=generator)
    param = torch.nn.Parameter(start.clone())
    optimizer = bitsandbytes.optim.Lion8bit([param], lr=lr, betas=(beta1, beta2), weight_decay=wd,
                                            min_8bit_size=4096)
    x, m = start.double(), torch.zeros(n, dtype=torch.float64)
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
        x = x - lr * (torch.sign(beta1 * m + (1 - beta1) * g) + wd * x)
        m = beta2 * m + (1 - beta2) * g
    matching = ((param.detach().double() - x).abs() < 1e-5).double().mean()
    assert matching > 0.99  # a momentum sign flipped by 8-bit rounding moves a weight by 2·lr


@pytest.mark.parametrize("safeguard_warmup, decouple, growth_rate", [(True, True, math.inf), (False, False, 1.5)])
def test_prodigy_matches_its_algorithm(safeguard_warmup, decouple, growth_rate):
    lr, (beta1, beta2), eps, wd, d0 = 1.0, (0.9, 0.999), 1e-3, 0.05, 1e-4  # eps large enough to matter
    start, trajectory, ds = run_optimizer(lambda params: Prodigy(
        params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, decouple=decouple, use_bias_correction=True,
        safeguard_warmup=safeguard_warmup, d0=d0, growth_rate=growth_rate))
    _, gradient = problem()
    beta3 = math.sqrt(beta2)
    x = start.clone()
    m, v, s = (torch.zeros(SIZE, dtype=torch.float64) for _ in range(3))
    d, d_max, numerator, reference, reference_ds = d0, d0, 0.0, [], []
    for k in range(STEPS):
        g = gradient(x, k) if decouple else gradient(x, k) + wd * x
        dlr = d * lr * math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1))
        numerator = beta3 * numerator + (d / d0) * dlr * torch.dot(g, start - x).item()
        m = beta1 * m + (1 - beta1) * d * g
        v = beta2 * v + (1 - beta2) * d * d * g * g
        s = beta3 * s + (d / d0) * (d if safeguard_warmup else dlr) * g
        d_hat = numerator / s.abs().sum().item()
        new_d = max(d, d_hat) if d == d0 else d
        d_max = max(d_max, d_hat)
        new_d = min(d_max, new_d * growth_rate)
        if decouple:
            x = x - dlr * wd * x
        x = x - dlr * m / (v.sqrt() + new_d * eps)
        d = new_d
        reference.append(x)
        reference_ds.append(d)
    assert reference_ds[-1] > 10 * d0  # the estimate moved, so its update rule was exercised
    assert ds == pytest.approx(reference_ds, rel=1e-4)
    assert_same_path(start, trajectory, reference)


@pytest.mark.parametrize("decouple, growth_rate", [(True, math.inf), (False, 1.2)])
def test_dadapt_adam_matches_its_algorithm(decouple, growth_rate):
    lr, (beta1, beta2), eps, wd, d0 = 1.0, (0.9, 0.999), 1e-3, 0.05, 1e-4
    start, trajectory, ds = run_optimizer(lambda params: DAdaptAdam(
        params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, decouple=decouple, d0=d0,
        growth_rate=growth_rate))
    _, gradient = problem()
    root = math.sqrt(beta2)
    x = start.clone()
    m, v, s = (torch.zeros(SIZE, dtype=torch.float64) for _ in range(3))
    d, numerator, reference, reference_ds = d0, 0.0, [], []
    for k in range(STEPS):
        g = gradient(x, k) if decouple else gradient(x, k) + wd * x
        dlr = d * lr
        numerator = root * numerator + (1 - root) * dlr * torch.dot(g, s / (v.sqrt() + eps)).item()
        m = beta1 * m + (1 - beta1) * dlr * g
        v = beta2 * v + (1 - beta2) * g * g
        s = root * s + (1 - root) * dlr * g
        d = max(d, min(numerator / ((1 - root) * s.abs().sum().item()), d * growth_rate))
        if decouple:
            x = x - wd * dlr * x
        x = x - m / (v.sqrt() + eps)
        reference.append(x)
        reference_ds.append(d)
    assert reference_ds[-1] > 10 * d0
    assert ds == pytest.approx(reference_ds, rel=1e-4)
    assert_same_path(start, trajectory, reference)


def test_dadapt_lion_matches_its_algorithm():
    lr, (beta1, beta2), wd, d0 = 1.0, (0.9, 0.99), 0.05, 1e-4
    start, trajectory, ds = run_optimizer(lambda params: DAdaptLion(params, lr=lr, betas=(beta1, beta2),
                                                                    weight_decay=wd, d0=d0))
    _, gradient = problem()
    root = math.sqrt(beta2)
    x, m, s = start.clone(), torch.zeros(SIZE, dtype=torch.float64), torch.zeros(SIZE, dtype=torch.float64)
    d, numerator, reference, reference_ds = d0, 0.0, [], []
    for k in range(STEPS):
        g = gradient(x, k)
        dlr = d * lr
        x = x * (1 - dlr * wd)
        u = torch.sign(beta1 * m + (1 - beta1) * g)
        x = x - dlr * u
        m = beta2 * m + (1 - beta2) * dlr * g
        numerator = root * numerator + (1 - root) * dlr * torch.dot(u, s).item()
        s = root * s + (1 - root) * dlr * u
        d = max(d, numerator / ((1 - root) * s.abs().sum().item()))
        reference.append(x)
        reference_ds.append(d)
    assert reference_ds[-1] > 10 * d0
    assert ds == pytest.approx(reference_ds, rel=1e-4)
    assert_same_path(start, trajectory, reference)


@pytest.mark.parametrize("momentum, growth_rate", [(0.0, math.inf), (0.5, 2.0)])
def test_dadapt_sgd_matches_its_algorithm(momentum, growth_rate):
    lr, wd, d0 = 1.0, 0.05, 1e-4
    start, trajectory, ds = run_optimizer(lambda params: DAdaptSGD(params, lr=lr, momentum=momentum,
                                                                   weight_decay=wd, d0=d0, growth_rate=growth_rate))
    _, gradient = problem()
    x, s = start.clone(), torch.zeros(SIZE, dtype=torch.float64)
    d, numerator, g0_norm, reference, reference_ds = d0, 0.0, None, [], []
    for k in range(STEPS):
        g = gradient(x, k)
        g0_norm = g0_norm or g.norm().item()
        g = g + wd * x
        dlr = d * lr / g0_norm
        numerator += dlr * torch.dot(g, s).item()
        s = s + dlr * g
        d = max(d, min(2 * numerator / s.norm().item(), d * growth_rate))
        x = momentum * x + (1 - momentum) * (start - s)
        reference.append(x)
        reference_ds.append(d)
    assert reference_ds[-1] > 10 * d0
    assert ds == pytest.approx(reference_ds, rel=1e-4)
    assert_same_path(start, trajectory, reference)


def test_adacoor_matches_its_algorithm_with_a_bfloat16_state():
    lr, eps = 0.5, 1e-2  # a large eps gives steps well above float32 rounding of the weights
    start, trajectory, _ = run_optimizer(lambda params: AdaCoor(params, lr=lr, eps=eps))
    _, gradient = problem()
    x, v, reference = start.clone(), torch.zeros(SIZE, dtype=torch.bfloat16), []
    for k in range(STEPS):
        g = gradient(x, k).float()
        v = (v.float() + eps * g * g).to(torch.bfloat16)
        x = x - lr * eps * g.double() / (v.double().sqrt() + eps)
        reference.append(x)
    assert_same_path(start, trajectory, reference)


def test_adacoor_keeps_its_state_in_bfloat16():
    param = torch.nn.Parameter(torch.ones(10))
    param.grad = torch.ones(10)
    optimizer = AdaCoor([param])
    optimizer.step()
    (state,) = optimizer.state.values()
    assert [t.dtype for t in state.values()] == [torch.bfloat16]
    assert param.detach() == pytest.approx(torch.full((10,), 1 - 1e-4), abs=1e-6)  # first step ≈ √eps


LEARNING_RATE_FREE = {
    "prodigy": lambda params: Prodigy(params, use_bias_correction=True, safeguard_warmup=True),
    "dadapt_adam": lambda params: DAdaptAdam(params, decouple=True),
    "dadapt_lion": lambda params: DAdaptLion(params),
    "dadapt_sgd": lambda params: DAdaptSGD(params),
    "adacoor": lambda params: AdaCoor(params),
}


@pytest.mark.parametrize("name", list(LEARNING_RATE_FREE))
def test_learning_rate_free_optimizers_minimise_a_quadratic_from_default_settings(name):
    """With lr 1 and d0 1e-6 the D-adapting ones must find the problem's scale themselves: d grows by orders
    of magnitude. AdaCoor has no d; with eps 1e-8 it moves by about 1e-4 a step, so its problem is scaled to fit."""
    generator = torch.Generator().manual_seed(3)
    scale = 1e-3 if name == "adacoor" else 1.0
    minimum = torch.randn(200, generator=generator) * scale
    curvature = torch.rand(200, generator=generator) + 0.5
    x = torch.nn.Parameter(torch.zeros(200))
    optimizer = LEARNING_RATE_FREE[name]([x])

    def loss():
        return (0.5 * curvature * (x - minimum) ** 2).sum()

    first = loss().item()
    for _ in range(300):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.05 * first
    if name != "adacoor":
        assert optimizer.d > 1000 * 1e-6


@pytest.mark.parametrize("name", list(LEARNING_RATE_FREE))
def test_learning_rate_free_state_resumes_exactly(name):
    """A state_dict saved mid-run, loaded into a fresh optimizer, continues exactly as the original would."""
    import io

    _, gradient = problem()

    def steps(param, optimizer, first, last):
        for k in range(first, last):
            param.grad = gradient(param.detach().double(), k).float()
            optimizer.step()

    param = torch.nn.Parameter(problem()[0].float())
    optimizer = LEARNING_RATE_FREE[name]([param])
    steps(param, optimizer, 0, 5)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_param = torch.nn.Parameter(param.detach().clone())
    resumed = LEARNING_RATE_FREE[name]([resumed_param])
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    steps(param, optimizer, 5, 10)
    steps(resumed_param, resumed, 5, 10)
    assert torch.equal(param, resumed_param)
