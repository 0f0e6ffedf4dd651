"""The LoRA down-projection with its dropout in one Triton kernel: h = lora_A(dropout(x)), forward and backward.

Why: in the fused LoRA forward of each 4-bit layer (speed.fused_lora_4bit_forward), `lora_A(lora_dropout(x))` is
torch's dropout kernel (it writes the dropped x, [T, K], and a bool mask, [T, K]) and then a skinny GEMM (r = 4..64
columns out); its backward multiplies by the mask, computes dA = dh^T @ x_dropped and dx = dh @ A, each a full pass
over [T, K] memory. With T = 16,000 tokens and K = 4096 these passes cost about 11% of a training step on an H200.
Here the forward reads x once and writes only h, [T, r]; the backward reads x once (when A needs a gradient) and
writes dx. Neither the dropped x nor the mask is stored: the mask is regenerated from a seed.

The mask: keep[t, k] = u(seed, t, k) >= p, where for column k of row t Philox-4x32-10 (tl.randint4x, keyed by the
seed) runs on the counter t * K/4 + k // 4 and word k % 4 of its four 32-bit words, w, is that element's:
u = (w >> 8) * 2^-24, uniform in [0, 1). One Philox call serves 4 neighbouring columns (K must be a multiple of 4),
and every element of a [T, K] input has its own word. `keep_mask` computes it for a tile, for every kernel here, so
the forward, the backward and `dropout_keep_mask` (the tests' reference) draw the same mask. Kept elements are
scaled by 1 / (1 - p), as torch's dropout does.

The seed is drawn from torch's default generator of x's device at each call, as a one-element tensor that the
kernels load (no host sync). torch.utils.checkpoint restores that generator's state before it recomputes a
forward, so the recomputed forward draws the same seed, hence the same mask.

Numerics, as autocast's linear: A is cast to x's dtype, the products are accumulated in float32 and h is stored in
x's dtype; the dropped x is rounded to x's dtype before the product, as torch's dropout output is. dA is accumulated
in float32 and returned in A's own dtype (autocast returns it through a bf16 copy of A).

torch and triton are imported on use, or guarded: the module imports without triton (kernel_problem then says why
the kernels cannot run).
"""

from __future__ import annotations

import functools
import importlib.util
import os

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # without triton nothing here launches a kernel (kernel_problem refuses), so they stay plain
    triton = tl = None

    def jit(fn):
        return fn


# Tile sizes. BLOCK_K columns make BLOCK_K / 4 Philox calls per row; both are tl.dot's operand dims, which must be
# at least 16. A forward program holds a [BLOCK_T, R_PAD] float32 accumulator and reads all of A from L2 once, so
# larger BLOCK_T means less A traffic but fewer programs (T / BLOCK_T = 250 for 16,000 tokens, for 132 SMs).
BLOCK_T = 64
BLOCK_K = 64
# The backward runs (K / BLOCK_K) x splits programs, each over a range of rows, summing its dA tile in registers and
# writing it once to its split's slice of a float32 buffer [splits, r, K] that torch sums (deterministic, unlike
# atomics). Splits are chosen to make about this many programs: several per SM, few partial sums to add.
BACKWARD_PROGRAMS = 512
# The float32 accumulators ([BLOCK_T, R_PAD] forward, [R_PAD, BLOCK_K] backward) live in registers
MAX_RANK = 128
# Compiled for sm_90 (Triton 3.8, ptxas -v), 4 warps need 252-255 registers a thread for the Philox words, the tiles
# and the accumulators, and spill from r = 64 on (bf16); 8 warps share them out: 140-254, no spills up to r = 128
NUM_WARPS = 8
# t * K + k and the pointer offsets are 32-bit integers in the kernels
MAX_ELEMENTS = 2**31
DTYPES = ("torch.bfloat16", "torch.float16", "torch.float32")


@jit
def keep_mask(seed, rows, col_start, K, p, BLOCK_K: tl.constexpr):
    """The keep mask of the tile rows x [col_start, col_start + BLOCK_K), col_start a multiple of 4 (module
    docstring: how it is derived)."""
    counters = rows[:, None] * (K // 4) + (col_start // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    # column 4g + c gets word c of counter g
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    return (words >> 8).to(tl.float32) * (1.0 / 16777216.0) >= p


@jit
def keep_mask_kernel(seed_ptr, keep_ptr, T, K, p, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    col_start = tl.program_id(1) * BLOCK_K
    cols = col_start + tl.arange(0, BLOCK_K)
    keep = keep_mask(tl.load(seed_ptr), rows, col_start, K, p, BLOCK_K)
    tl.store(keep_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < T) & (cols[None, :] < K))


@jit
def forward_kernel(x_ptr, a_ptr, h_ptr, seed_ptr, T, K, R, p, scale, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                   R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """h[rows] = (x[rows] * keep / (1 - p)) @ A^T for one block of rows, over all of K."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ranks = tl.arange(0, R_PAD)  # r padded to a size tl.dot takes; the padding is loaded as 0 and not stored
    seed = tl.load(seed_ptr)
    h = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    for col_start in range(0, K, BLOCK_K):
        cols = col_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < T) & (cols[None, :] < K),
                    other=0.0)
        keep = keep_mask(seed, rows, col_start, K, p, BLOCK_K)
        # rounded to x's dtype, as torch's dropout output is
        x_dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype).to(DOT_DTYPE)
        a_t = tl.load(a_ptr + ranks[None, :] * K + cols[:, None], mask=(ranks[None, :] < R) & (cols[:, None] < K),
                      other=0.0).to(DOT_DTYPE)
        h = tl.dot(x_dropped, a_t, h, input_precision=DOT_PRECISION)
    tl.store(h_ptr + rows[:, None] * R + ranks[None, :], h.to(h_ptr.dtype.element_ty),
             mask=(rows[:, None] < T) & (ranks[None, :] < R))


@jit
def backward_kernel(x_ptr, a_ptr, dh_ptr, seed_ptr, dx_ptr, da_partials_ptr, T, K, R, rows_per_program, p, scale,
                    COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                    R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """For one block of columns and one range of rows: dx = keep / (1 - p) * (dh @ A) for each [BLOCK_T, BLOCK_K]
    tile, and this range's share of dA = dh^T @ (x * keep / (1 - p)), written to da_partials[program_id(1)]."""
    col_start = tl.program_id(0) * BLOCK_K
    cols = col_start + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, R_PAD)
    seed = tl.load(seed_ptr)
    if COMPUTE_DX:
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K),
                    other=0.0).to(DOT_DTYPE)
    da = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    first_row = tl.program_id(1) * rows_per_program
    for row_start in range(first_row, tl.minimum(first_row + rows_per_program, T), BLOCK_T):
        rows = row_start + tl.arange(0, BLOCK_T)
        tile = (rows[:, None] < T) & (cols[None, :] < K)
        keep = keep_mask(seed, rows, col_start, K, p, BLOCK_K)
        # dh in x's dtype for the dot, as autocast's linear has it (its output, hence its gradient, is in that dtype)
        dh = tl.load(dh_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < T) & (ranks[None, :] < R),
                     other=0.0).to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
        if COMPUTE_DX:
            dx = tl.dot(dh, a, input_precision=DOT_PRECISION)
            tl.store(dx_ptr + rows[:, None] * K + cols[None, :],
                     tl.where(keep, dx * scale, 0.0).to(dx_ptr.dtype.element_ty), mask=tile)
        if COMPUTE_DA:
            x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=tile, other=0.0)
            x_dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype).to(DOT_DTYPE)
            da = tl.dot(tl.trans(dh), x_dropped, da, input_precision=DOT_PRECISION)
    if COMPUTE_DA:
        tl.store(da_partials_ptr + tl.program_id(1) * R * K + ranks[:, None] * K + cols[None, :], da,
                 mask=(ranks[:, None] < R) & (cols[None, :] < K))


def interpreter_mode() -> bool:
    """Triton's interpreter runs the kernels on CPU tensors (the tests); it is chosen when triton is imported."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def offsets_fit(rows: int, cols: int) -> bool:
    """Whether every offset t * K + k of a [rows, cols] input fits the kernels' 32-bit integers."""
    return rows * cols < MAX_ELEMENTS


def kernel_problem(x, weight, p: float) -> str | None:
    """Why the kernels cannot compute lora_A(dropout(x)) for x [..., K], A = weight [r, K] and this p; None when
    they can."""
    if not (x.is_cuda or interpreter_mode()):
        return f"x is on {x.device}, the kernels run on CUDA devices (or in Triton's interpreter)"
    if not 0 < p < 1:
        return f"dropout p = {p} is not in (0, 1)"
    if str(x.dtype) not in DTYPES or str(weight.dtype) not in DTYPES:
        return f"x is {x.dtype} and A {weight.dtype}, the kernels take {', '.join(DTYPES)}"
    K = x.shape[-1] if x.dim() else 0
    if weight.dim() != 2 or weight.shape[1] != K or not 1 <= weight.shape[0] <= MAX_RANK:
        return f"A is {tuple(weight.shape)} for x {tuple(x.shape)}: not [r, K] with r in 1..{MAX_RANK}"
    if weight.device != x.device:
        return f"A is on {weight.device} and x on {x.device}"
    if K == 0 or K % 4:
        return f"K = {K} is not a positive multiple of 4 (one Philox call draws 4 columns)"
    if x.numel() == 0:
        return "x is empty"
    if not offsets_fit(x.numel() // K, K):
        return f"x has {x.numel()} elements, 2**31 or more do not fit the kernels' 32-bit offsets"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def rank_padded(r: int) -> int:
    """r as tl.dot takes it: a power of 2, at least 16."""
    return max(16, triton.next_power_of_2(r))


def dot_settings(dtype) -> dict:
    """tl.dot's operand dtype and precision for x of this dtype. The operands are in x's dtype: bf16 and fp16 on the
    tensor cores, summed in float32, as autocast's linear; float32 in full float32 ("ieee"), as torch's float32 matmul
    by default (Triton's default, "tf32", applies to float32 operands only). Triton's interpreter multiplies bf16
    operands as their raw 16 bits (it stores bf16 as uint16, triton-lang/triton#11584), so there they are multiplied
    as float32: the same products (two bf16 multiply exactly in float32), the same float32 sums."""
    if str(dtype) == "torch.float32" or (str(dtype) == "torch.bfloat16" and interpreter_mode()):
        return dict(DOT_DTYPE=tl.float32, DOT_PRECISION="ieee")
    return dict(DOT_DTYPE={"torch.bfloat16": tl.bfloat16, "torch.float16": tl.float16}[str(dtype)],
                DOT_PRECISION="tf32")


def draw_seed(device):
    """The seed of one call: from torch's default generator of the device, whose state checkpoint restores before a
    recompute (module docstring); a one-element tensor on the device, which the kernels load."""
    import torch

    return torch.randint(0, 2**31 - 1, (1,), device=device)


def dropout_keep_mask(seed, T: int, K: int, p: float, device):
    """The keep mask [T, K] (bool) that the kernels draw for this seed (a one-element integer tensor) and p."""
    import torch

    if K % 4:
        raise ValueError(f"K = {K}: the mask is defined for K a multiple of 4")
    keep = torch.empty(T, K, dtype=torch.int8, device=device)
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(K, BLOCK_K))
    keep_mask_kernel[grid](seed, keep, T, K, p, BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return keep.bool()


@functools.cache
def lora_down_function():
    """The autograd Function, made on first use (torch is imported then)."""
    import torch

    class LoRADownWithDropout(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, seed, p):
            """x [T, K] contiguous, weight [r, K], seed a one-element integer tensor on x's device -> h [T, r]."""
            T, K = x.shape
            r = weight.shape[0]
            a = weight.detach().to(x.dtype).contiguous()
            h = torch.empty(T, r, dtype=x.dtype, device=x.device)
            forward_kernel[(triton.cdiv(T, BLOCK_T),)](
                x, a, h, seed, T, K, r, p, 1.0 / (1.0 - p), BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, R_PAD=rank_padded(r),
                **dot_settings(x.dtype), num_warps=NUM_WARPS)
            ctx.save_for_backward(x, a, seed)
            ctx.p, ctx.weight_dtype = p, weight.dtype
            return h

        @staticmethod
        def backward(ctx, dh):
            x, a, seed = ctx.saved_tensors
            compute_dx, compute_da = ctx.needs_input_grad[:2]
            if not (compute_dx or compute_da):
                return None, None, None, None
            T, K = x.shape
            r = a.shape[0]
            dh = dh.contiguous()
            k_blocks, t_blocks = triton.cdiv(K, BLOCK_K), triton.cdiv(T, BLOCK_T)
            splits = max(1, min(t_blocks, BACKWARD_PROGRAMS // k_blocks))
            rows_per_program = triton.cdiv(t_blocks, splits) * BLOCK_T
            splits = triton.cdiv(T, rows_per_program)
            dx = torch.empty_like(x) if compute_dx else None
            da_partials = torch.empty(splits, r, K, dtype=torch.float32, device=x.device) if compute_da else None
            backward_kernel[(k_blocks, splits)](
                x, a, dh, seed, x if dx is None else dx, x if da_partials is None else da_partials, T, K, r,
                rows_per_program, ctx.p, 1.0 / (1.0 - ctx.p), COMPUTE_DX=compute_dx, COMPUTE_DA=compute_da,
                BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, R_PAD=rank_padded(r), **dot_settings(x.dtype),
                num_warps=NUM_WARPS)
            da = da_partials.sum(0).to(ctx.weight_dtype) if compute_da else None
            return dx, da, None, None

    return LoRADownWithDropout


def lora_down_with_dropout(x, weight, p: float):
    """lora_A(dropout(x)) with lora_A.weight = weight [r, K] and dropout probability p, for x [..., K]: h [..., r] in
    x's dtype, differentiable in x and weight. None when the kernels cannot apply (kernel_problem says why): the
    caller computes it with torch then."""
    if kernel_problem(x, weight, p) is not None:
        return None
    K, r = x.shape[-1], weight.shape[0]
    h = lora_down_function().apply(x.reshape(-1, K).contiguous(), weight, draw_seed(x.device), p)
    return h.reshape(*x.shape[:-1], r)
