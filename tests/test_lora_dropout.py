"""The fused LoRA down-projection with dropout (curriculum/lora_dropout.py) against torch, in Triton's interpreter.

The interpreter is chosen when triton is imported, so each kernel test runs its body in a fresh Python with
TRITON_INTERPRET=1 (`interpreted`): the body computes, the test asserts on what it prints (JSON). Sizes are small,
T = 37 rows (the last block of rows partly masked) and K = 64 or 128 (one or two blocks of columns).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO

from curriculum import lora_dropout

PRELUDE = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
import torch
from curriculum.lora_dropout import draw_seed, dropout_keep_mask, lora_down_function, lora_down_with_dropout

def inputs(T, K, r, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=generator).to(dtype)
    weight = torch.randn(r, K, generator=generator) / K**0.5  # lora_A's weight: float32, as peft's
    return x, weight

def reference(x, weight, keep, p):
    \"\"\"lora_A(dropout(x)) in float32 with the kernels' mask.\"\"\"
    return (x.float() * keep / (1 - p)) @ weight.float().T

def relative_error(found, expected):
    return ((found.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
"""

CASES = [(K, r, p) for K in (64, 128) for r in (4, 8) for p in (0.05, 0.5)]
# bf16: h, dx and the dropped x are rounded to bf16 (8 bits), A is cast to bf16 as under autocast
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def interpreted(body: str):
    """Run PRELUDE + body in Triton's interpreter; what the body prints last, as JSON."""
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_forward_is_the_masked_product():
    errors = interpreted(f"""
        errors = {{}}
        for K, r, p in {CASES}:
            for dtype in (torch.float32, torch.bfloat16):
                x, weight = inputs(37, K, r, dtype)
                seed = torch.tensor([1234 + K + r])
                h = lora_down_function().apply(x, weight, seed, p)
                assert h.shape == (37, r) and h.dtype == dtype, (h.shape, h.dtype)
                keep = dropout_keep_mask(seed, 37, K, p, "cpu")
                errors[f"K={{K}} r={{r}} p={{p}} {{str(dtype)[6:]}}"] = relative_error(h, reference(x, weight, keep, p))
        print(json.dumps(errors))
    """)
    assert len(errors) == 2 * len(CASES)
    for case, error in errors.items():
        assert error < TOLERANCE[case.split()[-1]], (case, error)


def test_entry_point_takes_any_leading_dims():
    """x [2, 37, K] as the model passes it: h [2, 37, r], the same as the flattened input with the same seed."""
    result = interpreted("""
        x, weight = inputs(74, 64, 8, torch.bfloat16)
        torch.manual_seed(5)
        h = lora_down_with_dropout(x.view(2, 37, 64), weight, 0.1)
        torch.manual_seed(5)
        flat = lora_down_function().apply(x, weight, draw_seed("cpu"), 0.1)
        print(json.dumps({"shape": list(h.shape), "dtype": str(h.dtype), "same": torch.equal(h.view(74, 8), flat)}))
    """)
    assert result == {"shape": [2, 37, 8], "dtype": "torch.bfloat16", "same": True}


def test_backward_is_autograd_of_the_masked_product():
    """dx and dA against autograd of the reference with the same mask; and each alone when only x or only A needs a
    gradient (the other is not computed)."""
    errors = interpreted(f"""
        errors = {{}}
        for K, r, p in {CASES}:
            for dtype in (torch.float32, torch.bfloat16):
                x, weight = inputs(37, K, r, dtype, seed=K + r)
                dh = torch.randn(37, r, generator=torch.Generator().manual_seed(7)).to(dtype)
                seed = torch.tensor([99 + K + r])
                keep = dropout_keep_mask(seed, 37, K, p, "cpu")
                x_ref, weight_ref = x.float().clone().requires_grad_(), weight.clone().requires_grad_()
                reference(x_ref, weight_ref, keep, p).backward(dh.float())
                case = f"K={{K}} r={{r}} p={{p}} {{str(dtype)[6:]}}"
                for needs in ("both", "x", "weight"):
                    x_in = x.clone().requires_grad_(needs in ("both", "x"))
                    weight_in = weight.clone().requires_grad_(needs in ("both", "weight"))
                    lora_down_function().apply(x_in, weight_in, seed, p).backward(dh)
                    if x_in.requires_grad:
                        assert x_in.grad.dtype == dtype
                        errors[f"dx {{case}}"] = relative_error(x_in.grad, x_ref.grad)
                    if weight_in.requires_grad:
                        assert weight_in.grad.dtype == torch.float32
                        errors[f"dA {{case}}"] = relative_error(weight_in.grad, weight_ref.grad)
        print(json.dumps(errors))
    """)
    assert len(errors) == 4 * len(CASES)
    for case, error in errors.items():
        assert error < TOLERANCE[case.split()[-1]], (case, error)


def test_backward_over_several_row_ranges():
    """More rows than one backward program takes (BACKWARD_PROGRAMS / column blocks of them), so dA is the sum of
    several partial sums; rows that do not fill the last range."""
    errors = interpreted("""
        from curriculum import lora_dropout
        lora_dropout.BACKWARD_PROGRAMS = 4  # K = 64: one column block; 300 rows in ranges of 128, 128 and 44
        x, weight = inputs(300, 64, 8, torch.float32)
        dh = torch.randn(300, 8, generator=torch.Generator().manual_seed(3))
        seed, p = torch.tensor([42]), 0.3
        x_in, weight_in = x.clone().requires_grad_(), weight.clone().requires_grad_()
        lora_down_function().apply(x_in, weight_in, seed, p).backward(dh)
        x_ref, weight_ref = x.clone().requires_grad_(), weight.clone().requires_grad_()
        reference(x_ref, weight_ref, dropout_keep_mask(seed, 300, 64, p, "cpu"), p).backward(dh)
        print(json.dumps({"dx": relative_error(x_in.grad, x_ref.grad),
                          "dA": relative_error(weight_in.grad, weight_ref.grad)}))
    """)
    assert errors["dx"] < 1e-5 and errors["dA"] < 1e-5, errors


def philox4x32_10(counter: int, seed: int) -> tuple[int, int, int, int]:
    """Philox-4x32-10 (Salmon et al. 2011, as Random123 and tl.randint4x) on the counter (counter, 0, 0, 0), keyed by
    the seed's low and high 32 bits: the mask's definition written out in Python."""
    word = 0xFFFFFFFF
    c0, c1, c2, c3 = counter, 0, 0, 0
    k0, k1 = seed & word, seed >> 32
    for _ in range(10):
        product_0, product_2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (product_2 >> 32) ^ c1 ^ k0, product_2 & word, (product_0 >> 32) ^ c3 ^ k1, product_0 & word
        k0, k1 = (k0 + 0x9E3779B9) & word, (k1 + 0xBB67AE85) & word
    return c0, c1, c2, c3


def test_mask_is_the_documented_function():
    """keep[t, k] = ((word k % 4 of Philox(seed, t * K/4 + k // 4)) >> 8) * 2^-24 >= p, element by element."""
    T, K, p, seed = 5, 136, 0.5, 987654321  # K: two column blocks, the second partly masked
    found = interpreted(f"""
        keep = dropout_keep_mask(torch.tensor([{seed}]), {T}, {K}, {p}, "cpu")
        print(json.dumps(keep.tolist()))
    """)
    expected = [[(philox4x32_10(t * K // 4 + k // 4, seed)[k % 4] >> 8) * 2**-24 >= p for k in range(K)]
                for t in range(T)]
    assert found == expected


def test_mask_statistics_and_determinism():
    """The same seed draws the same mask; the next seed from the generator another. The keep fraction is 1 - p.
    Every element has its own random word: neighbouring rows, the 4 columns of one Philox call and consecutive
    column blocks (64 columns) agree on about half their elements at p = 0.5, not on all."""
    result = interpreted("""
        torch.manual_seed(0)
        seed, next_seed = draw_seed("cpu"), draw_seed("cpu")
        result = {"seeds differ": seed.item() != next_seed.item()}
        for p in (0.05, 0.5):
            keep = dropout_keep_mask(seed, 64, 4096, p, "cpu")
            result[f"keep fraction {p}"] = keep.float().mean().item()
            result[f"same seed {p}"] = torch.equal(keep, dropout_keep_mask(seed, 64, 4096, p, "cpu"))
            result[f"next seed {p}"] = torch.equal(keep, dropout_keep_mask(next_seed, 64, 4096, p, "cpu"))
        keep = dropout_keep_mask(seed, 64, 4096, 0.5, "cpu").float()
        result["rows agree"] = (keep[1:] == keep[:-1]).float().mean().item()
        result["Philox words agree"] = max((keep[:, c::4] == keep[:, c + 1::4]).float().mean().item() for c in range(3))
        result["column blocks agree"] = (keep[:, 64:] == keep[:, :-64]).float().mean().item()
        print(json.dumps(result))
    """)
    assert result.pop("seeds differ"), "the generator drew the same seed twice"
    for p in (0.05, 0.5):
        assert abs(result[f"keep fraction {p}"] - (1 - p)) < 0.01, result
        assert result[f"same seed {p}"] and not result[f"next seed {p}"], result
    for what in ("rows agree", "Philox words agree", "column blocks agree"):
        assert 0.48 < result[what] < 0.52, (what, result[what])


def test_checkpoint_replay_draws_the_same_mask():
    """torch.utils.checkpoint restores the generator's state before it recomputes the forward: the same seed, so the
    same h, and the same gradients as without checkpointing. Another generator state, another h."""
    result = interpreted("""
        from torch.utils.checkpoint import checkpoint
        x, weight = inputs(37, 64, 8, torch.float32)
        dh = torch.randn(37, 8, generator=torch.Generator().manual_seed(1))

        def forward(x):
            return lora_down_with_dropout(x, weight, 0.5)

        torch.manual_seed(11)
        h = forward(x)
        torch.manual_seed(11)
        replayed = forward(x)
        torch.manual_seed(12)
        other = forward(x)
        grads = []
        for checkpointed in (False, True):
            x_in = x.clone().requires_grad_()
            torch.manual_seed(11)
            out = checkpoint(forward, x_in, use_reentrant=False) if checkpointed else forward(x_in)
            torch.randn(100)  # what runs between the forward and the backward moves the generator on
            out.backward(dh)
            grads.append(x_in.grad)
        print(json.dumps({"replayed": torch.equal(h, replayed), "other seed": torch.equal(h, other),
                          "checkpointed gradient": torch.equal(*grads)}))
    """)
    assert result == {"replayed": True, "other seed": False, "checkpointed gradient": True}


@pytest.fixture
def interpreter_env(monkeypatch):
    """TRITON_INTERPRET=1 for the device check only: nothing here reaches a kernel (each case is refused first)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_refuses_what_the_kernels_cannot_take(interpreter_env):
    x, weight = torch.randn(37, 64), torch.randn(8, 64)
    for p in (0.0, 1.0, -0.1):
        assert lora_dropout.lora_down_with_dropout(x, weight, p) is None
    assert "not in (0, 1)" in lora_dropout.kernel_problem(x, weight, 0.0)
    refused = {"float64": (x.double(), weight), "K = 66": (torch.randn(37, 66), torch.randn(8, 66)),
               "A for another K": (x, torch.randn(8, 128)), "rank 256": (x, torch.randn(256, 64)),
               "empty": (torch.randn(0, 64), weight)}
    for case, (x_in, weight_in) in refused.items():
        assert lora_dropout.lora_down_with_dropout(x_in, weight_in, 0.1) is None, case
    # 2**31 elements and more: shapes alone (meta tensors allocate nothing)
    assert lora_dropout.offsets_fit(2**16, 2**15 - 4) and not lora_dropout.offsets_fit(2**16, 2**15)
    big = torch.empty(2, 2**15, 2**15, dtype=torch.bfloat16, device="meta")
    assert lora_dropout.lora_down_with_dropout(big, torch.empty(8, 2**15, device="meta"), 0.1) is None
    assert "32-bit offsets" in lora_dropout.kernel_problem(big, torch.empty(8, 2**15, device="meta"), 0.1)
    assert lora_dropout.kernel_problem(big[:1, :-1], torch.empty(8, 2**15, device="meta"), 0.1) is None


def test_refuses_a_cpu_tensor_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, weight = torch.randn(37, 64), torch.randn(8, 64)
    assert lora_dropout.lora_down_with_dropout(x, weight, 0.1) is None
    assert "CUDA" in lora_dropout.kernel_problem(x, weight, 0.1)
