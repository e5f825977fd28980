"""Which precision training runs in: bf16 only where the hardware runs it natively.

``mixed_precision: auto`` (the default) picks bf16 on a CUDA GPU with bf16 and on a CPU with AMX or
AVX-512-BF16, fp16 on a CUDA GPU without bf16, and fp32 ("no") elsewhere. On an AVX2-only CPU bf16
is emulated: a matrix product runs ~100x and a training step ~17x slower than fp32, so an explicit
``bf16`` there gets a one-line warning with the slowdown measured on the spot.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch

from kdlib.errors import KDError


@dataclass(frozen=True)
class Precision:
    mixed_precision: str  # what accelerate gets: "bf16", "fp16" or "no"
    reason: str  # why, in words, for the log line and the run's params


# oneDNN runs the bf16 matrix products. ONEDNN_MAX_CPU_ISA caps the instructions it may use: capped
# below these it emulates bf16 as an AVX2-only CPU does (which lets one host stand in for the other).
ONEDNN_BF16 = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "ALL", "DEFAULT")
ONEDNN_AMX = ("AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT")


def _onednn_cap() -> str:
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()


def _cpu_bf16() -> str | None:
    """The CPU feature that runs bf16 natively and oneDNN may use, or None."""
    cap = _onednn_cap()
    if torch.cpu._is_amx_tile_supported() and cap in ONEDNN_AMX:
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported() and cap in ONEDNN_BF16 + ONEDNN_AMX:
        return "AVX-512-BF16"
    return None


def _cpu_words() -> str:
    """This CPU as the log lines name it: its ATen capability, and oneDNN's cap when one is set."""
    capped = f", oneDNN capped at {_onednn_cap()}" if "ONEDNN_MAX_CPU_ISA" in os.environ else ""
    return f"{torch.backends.cpu.get_cpu_capability()}{capped}"


def _product_seconds(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    started = time.perf_counter()
    a @ b
    return a, b, time.perf_counter() - started


def matmul_rate(dtype: torch.dtype, budget_s: float = 0.1, largest: int = 2048) -> float:
    """Achieved FLOP/s of square matrix products in ``dtype`` on the CPU, in about ``budget_s`` seconds
    on any machine: the size grows toward ``largest`` only as far as ~20 products fit the budget, so an
    emulated dtype (bf16 on AVX2: ~1 GFLOP/s) is measured on small matrices instead of for minutes."""
    n = 128
    a, b, seconds = _product_seconds(n, dtype)
    while n < largest and seconds * 8 * 20 < budget_s:  # doubling n costs 8x per product
        n *= 2
        a, b, seconds = _product_seconds(n, dtype)  # the first product also warms this size up
    reps, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < budget_s or reps == 0:
        a @ b
        reps += 1
    return 2 * n**3 * reps / elapsed


@functools.cache  # once per process and value: the bf16 warning measures, and prints, once
def resolve(requested: str) -> Precision:
    """The precision to train in for ``train.mixed_precision`` = ``requested`` on this machine."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if requested == "auto":
            if torch.cuda.is_bf16_supported():
                return Precision("bf16", f"auto: {name} runs bf16 natively")
            return Precision("fp16", f"auto: {name} has no bf16; fp16 with loss scaling")
        return Precision(requested, f"as configured, on {name}")
    if requested == "fp16":
        raise KDError("config: train.mixed_precision = 'fp16' needs a CUDA GPU; expected 'auto', 'bf16' or 'no' on this machine")
    feature = _cpu_bf16()
    if requested == "auto":
        if feature:
            return Precision("bf16", f"auto: this CPU runs bf16 natively ({feature})")
        return Precision("no", f"auto: fp32, this CPU ({_cpu_words()}) has neither AMX nor AVX-512-BF16 to use and would emulate bf16")
    if requested == "bf16" and not feature:
        slowdown = matmul_rate(torch.float32) / matmul_rate(torch.bfloat16)
        print(
            f"warning: train.mixed_precision = 'bf16' on a CPU without AMX or AVX-512-BF16 to use ({_cpu_words()}): "
            f"bf16 matrix products measured {slowdown:.0f}x slower than fp32 here; 'auto' would train in fp32",
            flush=True,
        )
        return Precision("bf16", f"as configured; emulated on this CPU, {slowdown:.0f}x slower matrix products than fp32")
    return Precision(requested, "as configured")
