"""kept_sgd_cpu.first_unsupported, the check every fused step makes of its (param, grad)
pairs: the extension's version (csrc/module.cpp, used once it is loaded) against the Python
one (used before), on pairs that fail each of its tests."""

from __future__ import annotations

import pytest
import torch

from bame_optim.kernels import kept_sgd_cpu, native

from .test_kept_sgd_cpu import require_kernel


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    require_kernel(kept_sgd_cpu)


class _Subclass(torch.Tensor):
    """A tensor subclass without __torch_function__ changes: still not a plain tensor."""


def _support_cases() -> list[tuple[str, object, object]]:
    """(name, param, grad) pairs at every test of first_unsupported, passing and failing."""
    w = torch.randn(6, 8)
    wide = torch.randn(8, 6)
    conv = torch.randn(4, 8, 3, 3)
    cases = [
        ("plain", w, torch.randn(6, 8)),
        ("parameter", torch.nn.Parameter(w.clone()), torch.randn(6, 8)),
        ("float64", w.double(), torch.randn(6, 8, dtype=torch.float64)),
        ("float16", w.half(), torch.randn(6, 8).half()),
        ("bfloat16", w.bfloat16(), torch.randn(6, 8).bfloat16()),
        ("int", torch.ones(6, 8, dtype=torch.int32), torch.ones(6, 8, dtype=torch.int32)),
        ("complex", torch.randn(6, 8, dtype=torch.complex64),
         torch.randn(6, 8, dtype=torch.complex64)),
        ("conj bit", torch.randn(6, 8, dtype=torch.complex64).conj(),
         torch.randn(6, 8, dtype=torch.complex64).conj()),
        ("grad None", w, None),
        ("param subclass", w.as_subclass(_Subclass), torch.randn(6, 8)),
        ("grad subclass", w, torch.randn(6, 8).as_subclass(_Subclass)),
        ("grad parameter", w, torch.nn.Parameter(torch.randn(6, 8))),
        ("grad dtype", w, torch.randn(6, 8, dtype=torch.float64)),
        ("grad shape", w, torch.randn(5, 8)),  # the same strides
        ("meta", torch.empty(6, 8, device="meta"), torch.empty(6, 8, device="meta")),
        ("grad meta", w, torch.empty(6, 8, device="meta")),
        ("transposed", wide.t(), torch.randn(8, 6).t()),
        ("transposed, grad contiguous", wide.t(), torch.randn(6, 8)),
        ("param contiguous, grad transposed", w, torch.randn(8, 6).t()),
        ("sliced", torch.randn(6, 16)[:, ::2], torch.randn(6, 16)[:, ::2]),
        ("conv", conv, torch.randn(4, 8, 3, 3)),
        ("channels_last", conv.contiguous(memory_format=torch.channels_last),
         torch.randn(4, 8, 3, 3).contiguous(memory_format=torch.channels_last)),
        ("channels_last, grad contiguous", conv.contiguous(memory_format=torch.channels_last),
         torch.randn(4, 8, 3, 3)),
        ("channels_last sliced", conv.contiguous(memory_format=torch.channels_last)[..., :2],
         torch.randn(4, 8, 3, 3).contiguous(memory_format=torch.channels_last)[..., :2]),
        ("channels_last_3d", torch.randn(4, 8, 2, 3, 3).to(memory_format=torch.channels_last_3d),
         torch.randn(4, 8, 2, 3, 3).to(memory_format=torch.channels_last_3d)),
        ("3-D channels last", torch.randn(3, 8, 6).transpose(1, 2),  # a Conv1d's [3, 6, 8]
         torch.randn(3, 8, 6).transpose(1, 2)),
        ("3-D other order", torch.randn(8, 3, 6).permute(1, 2, 0),  # dim 1 inner, 0 and 2 not
         torch.randn(8, 3, 6).permute(1, 2, 0)),
        ("neg bit", torch._neg_view(w), torch.randn(6, 8)),
        ("grad neg bit", w, torch._neg_view(torch.randn(6, 8))),
        ("sparse grad", w, torch.randn(6, 8).to_sparse()),
        ("sparse param", w.to_sparse(), torch.randn(6, 8).to_sparse()),
        ("1-D", torch.randn(8), torch.randn(8)),
        ("empty", torch.randn(0, 8), torch.randn(0, 8)),
    ]
    return cases


@pytest.mark.parametrize("dtypes", [kept_sgd_cpu.EXACT_DTYPES, kept_sgd_cpu.DTYPES],
                         ids=["exact", "with half"])
def test_first_unsupported_native_matches_python(dtypes):
    """The extension's check (used once it is loaded) and the Python one (before) agree on
    every pair, alone and at each position of a list of otherwise supported pairs."""
    module = native.loaded()
    assert module is not None
    cases = _support_cases()
    for name, param, grad in cases:
        expected = kept_sgd_cpu._first_unsupported([param], [grad], dtypes)
        assert module.first_unsupported([param], [grad], dtypes is kept_sgd_cpu.DTYPES) == \
            expected, name
        assert kept_sgd_cpu.first_unsupported([param], [grad], dtypes) == expected, name
        good = [torch.randn(4, 8) for _ in range(3)]
        for at in range(4):
            params, grads = list(good), [g.clone() for g in good]
            params.insert(at, param)
            grads.insert(at, grad)
            assert kept_sgd_cpu.first_unsupported(params, grads, dtypes) == \
                kept_sgd_cpu._first_unsupported(params, grads, dtypes), (name, at)
    verdicts = {name: kept_sgd_cpu.first_unsupported([p], [g], dtypes) for name, p, g in cases}
    supported = {name for name, verdict in verdicts.items() if verdict < 0}
    expected = {"plain", "parameter", "grad parameter", "float64", "transposed", "conv", "1-D",
                "empty", "channels_last", "channels_last_3d", "3-D channels last"}
    if dtypes is kept_sgd_cpu.DTYPES:
        expected |= {"float16", "bfloat16"}
    assert supported == expected


def test_first_unsupported_lengths():
    """Lists of different lengths: the first unsupported pair before the shorter list ends,
    else ValueError, from both checks."""
    w, g = torch.randn(4, 8), torch.randn(4, 8)
    for check in (kept_sgd_cpu.first_unsupported,
                  lambda p, q: kept_sgd_cpu._first_unsupported(p, q, kept_sgd_cpu.EXACT_DTYPES)):
        assert check([w, w], [None]) == 0
        with pytest.raises(ValueError):
            check([w, w], [g])
        with pytest.raises(ValueError):
            check([w], [g, g])
