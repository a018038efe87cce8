"""bitsandbytes' 8-bit blockwise AdamW step for bf16 weights, as one Triton kernel with stochastic or compensated
rounding.

Stepping bf16 weights with bitsandbytes' kernel means an fp32 copy of the weights and gradients, its update, a
rounding pass and a copy back: about 80 bytes moved per weight, where this kernel reads the bf16 weights and
gradients and the 8-bit states and writes them back (12 bytes; 22 with the bucket's gather and scatter): for
SD1.5's UNet and text encoder about 13 ms on an H200, where torch's fused AdamW takes 11 on fp32 weights and
bitsandbytes' update alone, before the copies, 27 (doc/PERFORMANCE.md, run S). The math is bitsandbytes' CUDA kernel's
(`kOptimizer8bit2StateBlockwise`, Adam): the states are dequantized with their block's absolute maximum, updated,
the weight moved by `-lr * correction2 / correction1 * m / (sqrt(v) + correction2 * eps)` and then decayed, and the
states quantized again to the nearest code of their maps with the block's new maximum; a non-finite gradient
zeroes the element's states and leaves its weight. The states keep bitsandbytes' layout (blocks of 256, its maps),
so runs move between this kernel and bitsandbytes' own step, and its state_dict, unchanged.

The rounding draws its random bits from a counter-based generator (Philox, keyed by one number drawn from the run's
rounding stream per call), so a resumed run rounds as the uninterrupted one did. Compensated rounding adds each
weight's last rounding error back before the update, rounds to nearest and keeps the new error
(per_parameter.round_compensated_). CUDA only: the CPU steps through bitsandbytes (the tests run the kernel on the
CPU in Triton's interpreter).
"""
from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: bitsandbytes' own step is used
    triton = None

QUANTIZATION_BLOCK = 256  # elements per absolute maximum: bitsandbytes' blockwise optimizer states
# The state key of compensated rounding's errors (bf16, one per weight element), kept beside the optimizer's own
# states and saved and resumed with them.
COMPENSATION = "bf16_rounding_error"
BLOCKS_PER_PROGRAM = 4


def usable(inner: torch.optim.Optimizer, weights: torch.Tensor) -> bool:
    """Whether the kernel can step `inner` (a bitsandbytes optimizer) on these weights: bf16 on CUDA, and its Adam
    update with two betas (AdamW8bit, Adam8bit; not AdEMAMix)."""
    return (triton is not None and weights.dtype == torch.bfloat16 and weights.is_cuda
            and getattr(inner, "optimizer_name", None) == "adam" and len(inner.param_groups[0]["betas"]) == 2)


def step(inner: torch.optim.Optimizer, state: dict, weights: torch.Tensor, grads: torch.Tensor,
         rounding: torch.Generator | None) -> None:
    """One step of `inner` (bitsandbytes' AdamW8bit or Adam8bit over one parameter, whose `state` this is) on flat
    bf16 `weights` in place, from flat bf16 `grads`: both padded to whole quantization blocks. Rounded
    stochastically with `rounding`, or without it compensated with the state's rounding errors."""
    if state["state1"].dtype != torch.uint8:
        raise ValueError("bitsandbytes keeps 32-bit states for these weights (an optim_bits override?): the fused "
                         "8-bit step cannot update them")
    config = inner.get_config(0, 0, inner.param_groups[0])
    state["step"] += 1
    beta1, beta2 = config["betas"]
    correction1 = 1 - beta1 ** state["step"]
    correction2 = math.sqrt(1 - beta2 ** state["step"])
    compensated = rounding is None
    # Unused pointers (a constexpr branch leaves them out) point at the weights.
    seed = weights if compensated else \
        torch.randint(0, 1 << 62, (1,), dtype=torch.int64, device=weights.device, generator=rounding)
    blocks = weights.numel() // QUANTIZATION_BLOCK
    grid = (triton.cdiv(blocks, BLOCKS_PER_PROGRAM),)
    _adam_8bit_bf16[grid](
        weights, grads, state["state1"], state["state2"], state["absmax1"], state["absmax2"],
        state["qmap1"], state["qmap2"], seed, state[COMPENSATION] if compensated else weights, blocks,
        -config["lr"] * correction2 / correction1, correction2 * config["eps"],
        1 - config["lr"] * config["weight_decay"], beta1, beta2,
        BLOCK=QUANTIZATION_BLOCK, ROWS=BLOCKS_PER_PROGRAM, COMPENSATED=compensated, num_warps=4)


if triton is not None:
    @triton.jit
    def _nearest_code(x, qmap_ptr):
        """The index of the entry of the sorted 256-entry map `qmap` nearest to each of `x` (bisection, then the
        closer of the two bracketing entries)."""
        low = tl.zeros(x.shape, dtype=tl.int32)
        high = tl.full(x.shape, 255, dtype=tl.int32)
        for _ in tl.static_range(8):
            middle = (low + high) // 2
            above = x > tl.load(qmap_ptr + middle)
            low = tl.where(above, middle, low)
            high = tl.where(above, high, middle)
        closer_low = tl.abs(x - tl.load(qmap_ptr + low)) <= tl.abs(tl.load(qmap_ptr + high) - x)
        return tl.where(closer_low, low, high).to(tl.uint8)

    @triton.jit
    def _nearest_bf16_bits(bits):
        """fp32 values' bits (int32) rounded to the nearest bf16 value's, ties to even: the lower half cleared."""
        return (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536

    @triton.jit
    def _adam_8bit_bf16(weights_ptr, grads_ptr, state1_ptr, state2_ptr, absmax1_ptr, absmax2_ptr, qmap1_ptr,
                        qmap2_ptr, seed_ptr, compensation_ptr, blocks, step_size, scaled_eps, decay, beta1, beta2,
                        BLOCK: tl.constexpr, ROWS: tl.constexpr, COMPENSATED: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        in_bucket = rows < blocks
        offsets = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = in_bucket[:, None]
        grad = tl.load(grads_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        weight = tl.load(weights_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if COMPENSATED:
            weight += tl.load(compensation_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        code1 = tl.load(state1_ptr + offsets, mask=mask, other=0).to(tl.int32)
        code2 = tl.load(state2_ptr + offsets, mask=mask, other=0).to(tl.int32)
        absmax1 = tl.load(absmax1_ptr + rows, mask=in_bucket, other=0.0)
        absmax2 = tl.load(absmax2_ptr + rows, mask=in_bucket, other=0.0)
        m = tl.load(qmap1_ptr + code1) * absmax1[:, None]
        v = tl.load(qmap2_ptr + code2) * absmax2[:, None]

        finite = tl.abs(grad) < float("inf")  # false for inf and NaN
        m = tl.where(finite, m * beta1 + (1.0 - beta1) * grad, 0.0)
        v = tl.where(finite, v * beta2 + (1.0 - beta2) * grad * grad, 0.0)
        updated = (weight + step_size * (m / (tl.sqrt(v) + scaled_eps))) * decay
        weight = tl.where(finite, updated, weight)

        # Rounded on fp32's bits, so that the cast to bf16 only drops zeros (Triton's interpreter truncates there).
        bits = weight.to(tl.int32, bitcast=True)
        if COMPENSATED:  # to nearest, the rounding error kept for the next step
            bits = _nearest_bf16_bits(bits)
            error = _nearest_bf16_bits((weight - bits.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True))
            tl.store(compensation_ptr + offsets, error.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)
        else:
            # Stochastically: a uniform 16-bit number added to the bits bf16 drops carries into the kept half
            # exactly when the dropped part exceeds it.
            bits = (bits + (tl.randint(tl.load(seed_ptr), offsets) & 0xFFFF).to(tl.int32)) & -65536
        tl.store(weights_ptr + offsets, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)

        new_absmax1 = tl.max(tl.abs(m), axis=1)
        new_absmax2 = tl.max(v, axis=1)
        scale1 = tl.where(new_absmax1 > 0, new_absmax1, 1.0)
        scale2 = tl.where(new_absmax2 > 0, new_absmax2, 1.0)
        tl.store(state1_ptr + offsets, _nearest_code(m / scale1[:, None], qmap1_ptr), mask=mask)
        tl.store(state2_ptr + offsets, _nearest_code(v / scale2[:, None], qmap2_ptr), mask=mask)
        tl.store(absmax1_ptr + rows, new_absmax1, mask=in_bucket)
        tl.store(absmax2_ptr + rows, new_absmax2, mask=in_bucket)
