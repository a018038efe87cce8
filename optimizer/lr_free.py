"""Learning-rate-free optimizers: Prodigy and D-Adaptation (Adam, Lion, SGD).

Both families estimate D, the distance from the starting weights to a good solution, while training, and
step with d × lr where d is the running estimate. `lr` is therefore a multiplier of the adapted step
(1.0 = as estimated); an LR schedule still scales it (warmup, decay).

The estimate and its running sums are kept as 0-dim tensors on the parameters' device, so a step never reads
a value back from the GPU (the reference packages call .item() once or twice per parameter tensor). They are stored in every
param group, as the references do, so state_dict() saves them and a resumed run continues with the same d.
All param groups share one d and read lr from the first group.
"""
from __future__ import annotations

import math

import torch


class LearningRateFree(torch.optim.Optimizer):
    """What the four optimizers share: parameters with gradients, the shared scalars, and d for logging."""

    def _params_with_grad(self) -> list[tuple[dict, torch.Tensor]]:
        return [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _shared(self, device: torch.device, *keys: str) -> list[torch.Tensor]:
        group = self.param_groups[0]
        return [torch.as_tensor(group[key], dtype=torch.float32, device=device) for key in keys]

    def _store(self, **values) -> None:
        for group in self.param_groups:
            group.update(values)

    @property
    def d(self) -> float:
        """The current distance estimate (a host sync: for logging)."""
        return float(self.param_groups[0]["d"])

    @staticmethod
    def _gradient(group: dict, p: torch.Tensor, coupled_decay: bool) -> torch.Tensor:
        # The references add the L2 term to p.grad in place; a copy leaves the caller's gradients untouched.
        if coupled_decay and group["weight_decay"] != 0:
            return p.grad.add(p, alpha=group["weight_decay"])
        return p.grad


class Prodigy(LearningRateFree):
    """Adam with Prodigy step sizes (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive
    Parameter-Free Learner"), as in the prodigyopt package with d_coef 1, beta3 = √β2 and no slicing.

    Each step, with k the step count and d the current estimate (sums run over every parameter):
        dlr = d·lr·c,  c = √(1-β2^(k+1)) / (1-β1^(k+1)) with use_bias_correction, else 1
        numerator ← √β2·numerator + Σ (d/d0)·dlr·⟨g, x0 - x⟩
        m ← β1·m + (1-β1)·d·g,   v ← β2·v + (1-β2)·d²·g²
        s ← √β2·s + (d/d0)·(d if safeguard_warmup else dlr)·g
        d̂ = numerator / Σ|s|;   while d = d0: d ← max(d, d̂);   d_max ← max(d_max, d̂)
        d ← min(d_max, d·growth_rate)
        x ← x - dlr·wd·x (decouple; otherwise wd·x is added to g);   x ← x - dlr·m / (√v + d·eps), new d
    """

    def __init__(self, params, lr: float = 1.0, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decouple: bool = True, use_bias_correction: bool = False, safeguard_warmup: bool = False,
                 d0: float = 1e-6, growth_rate: float = math.inf):
        _check(lr=lr, betas=betas, d0=d0, growth_rate=growth_rate)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      decouple=decouple, use_bias_correction=use_bias_correction,
                                      safeguard_warmup=safeguard_warmup, d0=d0, growth_rate=growth_rate,
                                      d=d0, d_max=d0, numerator=0.0, k=0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        params = self._params_with_grad()
        if not params:
            return loss
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        beta3 = math.sqrt(beta2)
        k, d0, lr = first["k"], first["d0"], first["lr"]
        d, d_max, numerator = self._shared(params[0][1].device, "d", "d_max", "numerator")
        correction = math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) if first["use_bias_correction"] else 1.0
        dlr = d * lr * correction

        numerator = numerator * beta3
        s_l1 = torch.zeros_like(d)
        for group, p in params:
            grad = self._gradient(group, p, coupled_decay=not group["decouple"])
            state = self.state[p]
            if not state:
                state["x0"] = p.detach().clone()
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
                state["s"] = torch.zeros_like(p)
            numerator += (d / d0) * dlr * torch.dot(grad.flatten(), (state["x0"] - p).flatten())
            state["exp_avg"].mul_(beta1).add_(grad * (d * (1 - beta1)))
            state["exp_avg_sq"].mul_(beta2).add_(grad.square() * (d * d * (1 - beta2)))
            state["s"].mul_(beta3).add_(grad * ((d / d0) * (d if group["safeguard_warmup"] else dlr)))
            s_l1 += state["s"].abs().sum()

        d_hat = torch.where(s_l1 > 0, numerator / s_l1, d)
        d_new = torch.where(d == d0, torch.maximum(d, d_hat), d)
        d_max = torch.maximum(d_max, d_hat)
        d_new = torch.minimum(d_max, d_new * first["growth_rate"])

        for group, p in params:
            state = self.state[p]
            if group["decouple"] and group["weight_decay"] != 0:
                p.sub_(p * (dlr * group["weight_decay"]))
            p.sub_(state["exp_avg"] / (state["exp_avg_sq"].sqrt() + d_new * group["eps"]) * dlr)
        self._store(d=d_new, d_max=d_max, numerator=numerator, k=k + 1)
        return loss


class DAdaptAdam(LearningRateFree):
    """Adam with D-Adaptation step sizes (Defazio & Mishchenko 2023, "Learning-Rate-Free Learning by
    D-Adaptation"), as in the dadaptation package (v3) without bias correction or layer scales.

    Each step, with d the current estimate, dlr = d·lr, A = √v + eps taken before this step's update of v:
        numerator ← √β2·numerator + (1-√β2)·Σ dlr·⟨g, s/A⟩
        m ← β1·m + (1-β1)·dlr·g,   v ← β2·v + (1-β2)·g²,   s ← √β2·s + (1-√β2)·dlr·g
        d̂ = numerator / ((1-√β2)·Σ|s|);   d ← max(d, min(d̂, d·growth_rate))
        x ← x - dlr·wd·x (decouple; otherwise wd·x is added to g);   x ← x - m / (√v + eps)
    """

    def __init__(self, params, lr: float = 1.0, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decouple: bool = False, d0: float = 1e-6, growth_rate: float = math.inf):
        _check(lr=lr, betas=betas, d0=d0, growth_rate=growth_rate)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      decouple=decouple, growth_rate=growth_rate, d=d0, numerator=0.0, k=0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        params = self._params_with_grad()
        if not params:
            return loss
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        root_beta2 = math.sqrt(beta2)
        d, numerator = self._shared(params[0][1].device, "d", "numerator")
        dlr = d * first["lr"]

        step_numerator = torch.zeros_like(d)
        s_l1 = torch.zeros_like(d)
        for group, p in params:
            grad = self._gradient(group, p, coupled_decay=not group["decouple"])
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
                state["s"] = torch.zeros_like(p)
            previous_denom = state["exp_avg_sq"].sqrt() + group["eps"]
            step_numerator += dlr * torch.dot(grad.flatten(), (state["s"] / previous_denom).flatten())
            state["exp_avg"].mul_(beta1).add_(grad * (dlr * (1 - beta1)))
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            state["s"].mul_(root_beta2).add_(grad * (dlr * (1 - root_beta2)))
            s_l1 += state["s"].abs().sum()

        numerator = root_beta2 * numerator + (1 - root_beta2) * step_numerator
        d_hat = torch.where(s_l1 > 0, numerator / ((1 - root_beta2) * s_l1), d)
        d_new = torch.maximum(d, torch.minimum(d_hat, d * first["growth_rate"]))

        for group, p in params:
            state = self.state[p]
            if group["decouple"] and group["weight_decay"] != 0:
                p.sub_(p * (dlr * group["weight_decay"]))
            p.sub_(state["exp_avg"] / (state["exp_avg_sq"].sqrt() + group["eps"]))
        self._store(d=d_new, numerator=numerator, k=first["k"] + 1)
        return loss


class DAdaptLion(LearningRateFree):
    """Lion with D-Adaptation step sizes (Defazio & Mishchenko 2023), as in the dadaptation package (v3).

    Each step, with d the current estimate and dlr = d·lr:
        x ← x·(1 - dlr·wd);   u = sign(β1·m + (1-β1)·g);   x ← x - dlr·u
        m ← β2·m + (1-β2)·dlr·g
        numerator ← √β2·numerator + (1-√β2)·Σ dlr·⟨u, s⟩;   s ← √β2·s + (1-√β2)·dlr·u
        d̂ = numerator / ((1-√β2)·Σ|s|);   d ← max(d, d̂)
    The momentum m holds dlr-scaled gradients while u mixes it with the raw gradient: that is the reference's
    behaviour (early on, while d is tiny, u is close to sign(g)), kept so results match it.
    """

    def __init__(self, params, lr: float = 1.0, betas=(0.9, 0.99), weight_decay: float = 0.0, d0: float = 1e-6):
        _check(lr=lr, betas=betas, d0=d0)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, d=d0, numerator=0.0,
                                      k=0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        params = self._params_with_grad()
        if not params:
            return loss
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        root_beta2 = math.sqrt(beta2)
        d, numerator = self._shared(params[0][1].device, "d", "numerator")
        dlr = d * first["lr"]

        step_numerator = torch.zeros_like(d)
        s_l1 = torch.zeros_like(d)
        for group, p in params:
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p)
                state["s"] = torch.zeros_like(p)
            exp_avg, s = state["exp_avg"], state["s"]
            p.mul_(1 - dlr * group["weight_decay"])
            update = (exp_avg * beta1 + p.grad * (1 - beta1)).sign_()
            p.sub_(update * dlr)
            exp_avg.mul_(beta2).add_(p.grad * (dlr * (1 - beta2)))
            step_numerator += dlr * torch.dot(update.flatten(), s.flatten())
            s.mul_(root_beta2).add_(update * (dlr * (1 - root_beta2)))
            s_l1 += s.abs().sum()

        numerator = root_beta2 * numerator + (1 - root_beta2) * step_numerator
        d_hat = torch.where(s_l1 > 0, numerator / ((1 - root_beta2) * s_l1), d)
        self._store(d=torch.maximum(d, d_hat), numerator=numerator, k=first["k"] + 1)
        return loss


class DAdaptSGD(LearningRateFree):
    """SGD with D-Adaptation step sizes (Defazio & Mishchenko 2023), as in the dadaptation package (v3).

    The first step measures ‖g0‖, the norm of the first gradient. Each step, with d the current estimate,
    dlr = d·lr/‖g0‖ and g including the L2 term wd·x:
        numerator ← numerator + Σ dlr·⟨g, s⟩;   s ← s + dlr·g
        d̂ = 2·numerator / ‖s‖;   d ← max(d, min(d̂, d·growth_rate))
        z = x0 - s;   x ← momentum·x + (1-momentum)·z
    """

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.0, weight_decay: float = 0.0, d0: float = 1e-6,
                 growth_rate: float = math.inf):
        _check(lr=lr, d0=d0, growth_rate=growth_rate)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, growth_rate=growth_rate,
                                      d=d0, numerator=0.0, g0_norm=0.0, k=0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        params = self._params_with_grad()
        if not params:
            return loss
        first = self.param_groups[0]
        d, numerator, g0_norm = self._shared(params[0][1].device, "d", "numerator", "g0_norm")
        if first["k"] == 0:  # the first gradient, before weight decay, sets the scale of every later step
            g0_norm = torch.sqrt(sum(p.grad.square().sum() for _, p in params))
        dlr = d * first["lr"] / g0_norm

        step_numerator = torch.zeros_like(d)
        s_squared = torch.zeros_like(d)
        for group, p in params:
            grad = self._gradient(group, p, coupled_decay=True)
            state = self.state[p]
            if not state:
                state["x0"] = p.detach().clone()
                state["s"] = torch.zeros_like(p)
            step_numerator += dlr * torch.dot(grad.flatten(), state["s"].flatten())
            state["s"].add_(grad * dlr)
            s_squared += state["s"].square().sum()

        numerator = numerator + step_numerator
        d_hat = torch.where(s_squared > 0, 2 * numerator / s_squared.sqrt(), d)
        d_new = torch.maximum(d, torch.minimum(d_hat, d * first["growth_rate"]))
        for group, p in params:
            state = self.state[p]
            z = state["x0"] - state["s"]
            p.mul_(group["momentum"]).add_(z * (1 - group["momentum"]))
        self._store(d=d_new, numerator=numerator, g0_norm=g0_norm, k=first["k"] + 1)
        return loss


def _evaluate(closure):
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _check(lr: float, d0: float, betas=(0.0, 0.0), growth_rate: float = math.inf) -> None:
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0 (it multiplies the adapted step; 1.0 is usual), got {lr}")
    if not d0 > 0:
        raise ValueError(f"d0 must be > 0, got {d0}")
    if not all(0 <= beta < 1 for beta in betas):
        raise ValueError(f"betas must be in [0, 1), got {betas}")
    if not growth_rate >= 1:
        raise ValueError(f"growth_rate must be >= 1, got {growth_rate}")
