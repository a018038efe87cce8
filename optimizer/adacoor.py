"""AdaCoor: EveryDream2's learning-rate-free optimizer with a bfloat16 state."""
from __future__ import annotations

import torch


class AdaCoor(torch.optim.Optimizer):
    """CoordinateDoWG (Khaled, Mishchenko & Jin 2023, "DoWG Unleashed: An Efficient Universal Parameter-Free
    Gradient Descent Method") stripped down as EveryDream2's AdaCoor: the per-coordinate distance estimate is
    replaced by the constant eps, and the one state tensor is kept in bfloat16 (half the memory of float32).

    Per coordinate, each step:
        v ← v + eps·g²   (stored in bfloat16)
        x ← x - lr·eps·g / (√v + eps)
    With lr = 1 the first step moves every weight by about √eps (1e-4 for the recommended eps 1e-8); later
    steps shrink as squared gradients accumulate, as in AdaGrad. lr multiplies the step (1.0 = AdaCoor as
    published), which lets an LR schedule warm it up or decay it. Like AdaGrad it takes smaller steps the
    larger the batch, so batch sizes up to about 8 suit it best.
    """

    def __init__(self, params, lr: float = 1.0, eps: float = 1e-8):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0 (it multiplies the step; 1.0 is usual), got {lr}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (1e-8 is recommended), got {eps}")
        super().__init__(params, dict(lr=lr, eps=eps))

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)  # which casts floating-point state to the parameters' dtype
        for state in self.state.values():
            state["sum_sq"] = state["sum_sq"].to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eps = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["sum_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                sum_sq = state["sum_sq"]
                sum_sq.add_(p.grad.square() * eps)
                denom = sum_sq.to(p.dtype).sqrt_().add_(eps)
                p.addcdiv_(p.grad, denom, value=-group["lr"] * eps)
        return loss
