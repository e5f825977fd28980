"""Precision chosen for the hardware: bf16 only where it runs natively."""

from __future__ import annotations

import pytest
import torch

from kdlib import precision
from kdlib.errors import KDError


@pytest.fixture
def cpu(monkeypatch):
    """A CPU-only machine whose bf16 feature the test sets."""
    precision.resolve.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yield lambda feature: monkeypatch.setattr(precision, "_cpu_bf16", lambda: feature)
    precision.resolve.cache_clear()


@pytest.mark.parametrize(("feature", "expected"), [("AMX", "bf16"), ("AVX-512-BF16", "bf16"), (None, "no")])
def test_auto_picks_bf16_only_where_the_cpu_runs_it(cpu, feature, expected):
    cpu(feature)
    chosen = precision.resolve("auto")
    assert chosen.mixed_precision == expected
    assert (feature or "would emulate bf16") in chosen.reason


def test_explicit_bf16_on_an_emulating_cpu_warns_once_with_the_measured_slowdown(cpu, monkeypatch, capsys):
    cpu(None)
    monkeypatch.setattr(precision, "matmul_rate", lambda dtype, **_: 100.0 if dtype == torch.float32 else 1.0)
    assert precision.resolve("bf16").mixed_precision == "bf16"
    precision.resolve("bf16")
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and "bf16 matrix products measured 100x slower than fp32 here" in out


def test_fp16_needs_cuda_and_explicit_choices_stand(cpu):
    cpu("AMX")
    with pytest.raises(KDError, match="'fp16' needs a CUDA GPU"):
        precision.resolve("fp16")
    assert precision.resolve("no").mixed_precision == "no" and precision.resolve("bf16").mixed_precision == "bf16"


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu(monkeypatch, bf16, expected):
    precision.resolve.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert precision.resolve("auto").mixed_precision == expected
    precision.resolve.cache_clear()


def test_the_matmul_probe_answers_for_every_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        assert precision.matmul_rate(dtype, budget_s=0.05) > 0


@pytest.mark.parametrize(
    ("cap", "expected"),
    [(None, "AMX"), ("AVX512_CORE_AMX", "AMX"), ("AVX512_CORE_BF16", "AVX-512-BF16"), ("AVX512_CORE", None), ("AVX2", None)],
)
def test_a_onednn_cap_below_bf16_counts_as_a_cpu_that_emulates_it(monkeypatch, cap, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert precision._cpu_bf16() == expected


def test_auto_names_the_onednn_cap_when_it_chose_fp32(monkeypatch):
    precision.resolve.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    chosen = precision.resolve("auto")
    precision.resolve.cache_clear()
    assert chosen.mixed_precision == "no" and "oneDNN capped at AVX2" in chosen.reason
