"""The optimizers as optimizer.json builds them: those from their authors' packages (Lion from lion-pytorch, Prodigy
from prodigyopt, D-Adaptation from dadaptation) get the file's options and train exactly as the package's class built
directly; Lion, Lion8bit and AdaCoor follow their published formulas, written out independently here; the
learning-rate-free ones find a problem's scale from their defaults; every state resumes exactly.

The formula checks run the optimizer on two parameter tensors and the reference on one flat float64 vector (the two
concatenated). Gradients come from a noisy quadratic evaluated at each side's own weights, so a wrong step changes
every later one.
"""
from __future__ import annotations

import io
import math
from types import SimpleNamespace

import dadaptation
import lion_pytorch
import prodigyopt
import pytest
import torch

from optimizer.adacoor import AdaCoor
from optimizer.optimizers import LEARNING_RATE_FREE, TrainingOptimizers, make_optimizer, resolve_settings

SHAPES = ((6, 5), (7,))
SIZE = sum(math.prod(shape) for shape in SHAPES)
STEPS = 40


def settings(name: str, **options):
    """The UNet's resolved settings for an optimizer.json whose base section names `name` with `options`."""
    main = SimpleNamespace(lr=None, lr_scheduler="constant", lr_warmup_steps=None, lr_decay_steps=None, max_epochs=1,
                           sources={}, scale_lr=False, batch_size=1, grad_accum=1)
    return resolve_settings({"base": {"optimizer": name, **options}}, main, steps_per_epoch=10)


def built(name: str, params, **options) -> torch.optim.Optimizer:
    return make_optimizer(params, settings(name, **options)["unet"])


# name -> (optimizer.json options other than the defaults, the package's optimizer built directly with them, as
# EveryDream2 builds it: Prodigy with Adam's bias correction on).
FROM_PACKAGES = {
    "lion": ({"lr": 3e-3, "betas": [0.8, 0.95], "weight_decay": 0.1},
             lambda params: lion_pytorch.Lion(params, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1)),
    "prodigy": ({"lr": 0.5, "betas": [0.8, 0.99], "epsilon": 1e-6, "weight_decay": 0.1, "decouple": False,
                 "d0": 1e-4, "growth_rate": 1.5, "safeguard_warmup": False},
                lambda params: prodigyopt.Prodigy(params, lr=0.5, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1,
                                                  decouple=False, use_bias_correction=True, safeguard_warmup=False,
                                                  d0=1e-4, growth_rate=1.5)),
    "dadapt_adam": ({"lr": 0.5, "betas": [0.8, 0.99], "epsilon": 1e-6, "weight_decay": 0.1, "decouple": False,
                     "d0": 1e-4, "growth_rate": 1.5},
                    lambda params: dadaptation.DAdaptAdam(params, lr=0.5, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1,
                                                          decouple=False, d0=1e-4, growth_rate=1.5)),
    "dadapt_adan": ({"lr": 0.5, "betas": [0.9, 0.9, 0.95], "epsilon": 1e-6, "weight_decay": 0.1, "no_prox": True,
                     "d0": 1e-4, "growth_rate": 1.5},
                    lambda params: dadaptation.DAdaptAdan(params, lr=0.5, betas=(0.9, 0.9, 0.95), eps=1e-6,
                                                          weight_decay=0.1, no_prox=True, d0=1e-4, growth_rate=1.5)),
    "dadapt_lion": ({"lr": 0.5, "betas": [0.8, 0.95], "weight_decay": 0.1, "d0": 1e-4},
                    lambda params: dadaptation.DAdaptLion(params, lr=0.5, betas=(0.8, 0.95), weight_decay=0.1,
                                                          d0=1e-4)),
    "dadapt_sgd": ({"lr": 0.5, "momentum": 0.5, "weight_decay": 0.1, "d0": 1e-4, "growth_rate": 1.5},
                   lambda params: dadaptation.DAdaptSGD(params, lr=0.5, momentum=0.5, weight_decay=0.1, d0=1e-4,
                                                        growth_rate=1.5)),
}


def hyperparameters(optimizer: torch.optim.Optimizer) -> dict:
    return {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}


@pytest.mark.parametrize("name", FROM_PACKAGES)
def test_each_name_builds_its_package_optimizer_with_the_files_options(name):
    options, package_optimizer = FROM_PACKAGES[name]
    ours = built(name, [torch.nn.Parameter(torch.zeros(3))], **options)
    direct = package_optimizer([torch.nn.Parameter(torch.zeros(3))])
    assert type(ours) is type(direct)
    assert hyperparameters(ours) == hyperparameters(direct)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))


def train(model: torch.nn.Module, step, steps: int = 8) -> list[float]:
    """Fits the model to a fixed random map; `step` applies the gradients. Returns d after each step (or NaN)."""
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(32, 8, generator=generator), torch.randn(32, 8, generator=generator)
    ds = []
    for _ in range(steps):
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        ds.append(step())
    return ds


@pytest.mark.parametrize("name", FROM_PACKAGES)
def test_training_with_an_optimizer_from_the_file_matches_the_package_built_directly(name):
    """The trainer's optimizers (built from optimizer.json, stepped with their LR schedule) against the package's class
    built by hand with the same options, on a small network: weights and d must agree exactly."""
    options, package_optimizer = FROM_PACKAGES[name]
    ours_model, direct_model = tiny_model(), tiny_model()
    ours = TrainingOptimizers({"unet": ours_model}, settings(name, **options))
    direct = package_optimizer(direct_model.parameters())

    def step_ours():
        assert ours.clip_and_step(None, clip_grad_norm=None)[1]
        ours.step_schedules()
        return ours.optimizers["unet"].param_groups[0].get("d", math.nan)

    def step_direct():
        direct.step()
        direct.zero_grad(set_to_none=True)
        return direct.param_groups[0].get("d", math.nan)

    ours_ds, direct_ds = train(ours_model, step_ours), train(direct_model, step_direct)
    assert ours_ds == pytest.approx(direct_ds, rel=0, abs=0, nan_ok=True)
    for ours_weight, direct_weight in zip(ours_model.parameters(), direct_model.parameters()):
        assert torch.equal(ours_weight, direct_weight)
    assert not torch.equal(next(ours_model.parameters()), next(tiny_model().parameters()))  # it did train


def problem(seed: int = 0):
    """Start point, curvature, minimum and per-step gradient noise of a quadratic on SIZE weights."""
    generator = torch.Generator().manual_seed(seed)
    # Small start weights keep float32 rounding of the weights far below the steps.
    start = torch.randn(SIZE, generator=generator, dtype=torch.float64) * 1e-3
    curvature = torch.rand(SIZE, generator=generator, dtype=torch.float64) * 2 + 0.1
    minimum = torch.randn(SIZE, generator=generator, dtype=torch.float64)
    noise = torch.randn(STEPS, SIZE, generator=generator, dtype=torch.float64) * 0.1
    return start, lambda x, k: curvature * (x - minimum) + noise[k]


def run_optimizer(make, steps: int = STEPS, seed: int = 0):
    """The optimizer under test on the split weights; returns the start and the flat weights after each step."""
    start, gradient = problem(seed)
    params = [torch.nn.Parameter(part.reshape(shape).float().clone())
              for part, shape in zip(start.split([math.prod(s) for s in SHAPES]), SHAPES)]
    optimizer = make(params)
    trajectory = []
    for k in range(steps):
        flat = torch.cat([p.detach().flatten() for p in params]).double()
        for p, g in zip(params, gradient(flat, k).split([p.numel() for p in params])):
            p.grad = g.reshape(p.shape).float()
        optimizer.step()
        trajectory.append(torch.cat([p.detach().flatten() for p in params]).double())
    return start, trajectory


def assert_same_path(start, trajectory, reference):
    """Compares displacements from the start, to float32 precision: relative to each weight's displacement,
    and to the largest one for weights that pass back over their start."""
    for k, (got, want) in enumerate(zip(trajectory, reference)):
        scale = (want - start).abs().max().item()
        error = ((got - want).abs() - 2e-4 * (want - start).abs()).max().item()
        assert error <= 2e-5 * scale, f"step {k}: off by {error:.3g} where steps reach {scale:.3g}"


def test_lion_matches_the_formula():
    lr, (beta1, beta2), wd = 0.01, (0.9, 0.99), 0.1
    start, trajectory = run_optimizer(lambda params: built("lion", params, lr=lr, betas=[beta1, beta2],
                                                           weight_decay=wd))
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


def test_adacoor_matches_its_algorithm_with_a_bfloat16_state():
    lr, eps = 0.5, 1e-2  # a large eps gives steps well above float32 rounding of the weights
    start, trajectory = run_optimizer(lambda params: AdaCoor(params, lr=lr, eps=eps))
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


@pytest.mark.parametrize("name", LEARNING_RATE_FREE)
def test_learning_rate_free_optimizers_minimise_a_quadratic_from_default_settings(name):
    """With lr 1 and d0 1e-6 the D-adapting ones must find the problem's scale themselves: d grows by orders
    of magnitude. AdaCoor has no d; with eps 1e-8 it moves by about 1e-4 a step, so its problem is scaled to fit.
    D-Adaptation's Adan, experimental in its package, overshoots (d about 20) and its loss hovers at 3-11% of the
    start."""
    generator = torch.Generator().manual_seed(3)
    scale = 1e-3 if name == "adacoor" else 1.0
    minimum = torch.randn(200, generator=generator) * scale
    curvature = torch.rand(200, generator=generator) + 0.5
    x = torch.nn.Parameter(torch.zeros(200))
    optimizer = built(name, [x], weight_decay=0.0)

    def loss():
        return (0.5 * curvature * (x - minimum) ** 2).sum()

    first = loss().item()
    for _ in range(300):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < (0.15 if name == "dadapt_adan" else 0.05) * first
    if name != "adacoor":
        assert optimizer.param_groups[0]["d"] > 1000 * 1e-6


@pytest.mark.parametrize("name", ["lion", *LEARNING_RATE_FREE])
def test_optimizer_state_resumes_exactly(name):
    """A state_dict saved mid-run, loaded into a fresh optimizer, continues exactly as the original would."""
    _, gradient = problem()

    def steps(param, optimizer, first, last):
        for k in range(first, last):
            param.grad = gradient(param.detach().double(), k).float()
            optimizer.step()

    param = torch.nn.Parameter(problem()[0].float())
    optimizer = built(name, [param])
    steps(param, optimizer, 0, 5)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_param = torch.nn.Parameter(param.detach().clone())
    resumed = built(name, [resumed_param])
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    steps(param, optimizer, 5, 10)
    steps(resumed_param, resumed, 5, 10)
    assert torch.equal(param, resumed_param)
