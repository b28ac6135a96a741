"""The ``bame_optim::kept_sgd_`` / ``kept_adamw_`` ops: schemas, the CPU implementation (bit
for bit the CPU path of :mod:`bame_optim.optim.functional`), ``opcheck``, the fake
implementation, a compiled step without graph breaks, and on CUDA the optimizers' steps."""

from __future__ import annotations

import warnings

import pytest
import torch

from bame_optim.core.kept import encode_kept
from bame_optim.core.nm import blocks_to_param, random_nm_mask
from bame_optim.kernels import ops, triton_kept
from bame_optim.optim.functional import kept_adamw, kept_sgd

SGD_CONFIGS = [
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=True),
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True, maximize=False),
]
CUDA_ULPS = 4
"""CUDA (Triton) against the CPU: a few float32 ulps of the tensor's scale, as in
tests/test_triton_kept.py (fused multiply-adds round differently)."""


def _assert_near(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tolerance = CUDA_ULPS * torch.finfo(torch.float32).eps
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=tolerance,
                               atol=tolerance * scale)


def test_op_schemas():
    assert str(torch.ops.bame_optim.kept_sgd_.default._schema) == (
        "bame_optim::kept_sgd_(Tensor(a0!)[] params, Tensor[] grads, Tensor(a2!)[] "
        "momentum_buffers, Tensor[] kept, SymInt[] counts, bool[] first, *, SymInt m, float lr, "
        "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize) -> ()"
    )
    assert str(torch.ops.bame_optim.kept_adamw_.default._schema) == (
        "bame_optim::kept_adamw_(Tensor(a0!)[] params, Tensor[] grads, Tensor(a2!)[] exp_avgs, "
        "Tensor(a3!)[] exp_avg_sqs, Tensor(a4!)[] max_exp_avg_sqs, Tensor(a5!)[] state_steps, "
        "Tensor[] kept, SymInt[] counts, *, SymInt m, bool amsgrad, float beta1, float beta2, "
        "float lr, float weight_decay, float eps, bool maximize) -> ()"
    )


def test_kept_ops_stay_out_of_cuda_graphs():
    # Their launch table and step sizes are built on the host at every call.
    for op in (torch.ops.bame_optim.kept_sgd_, torch.ops.bame_optim.kept_adamw_):
        assert torch.Tag.cudagraph_unsafe in op.default.tags


def _cpu_group(seed=0):
    """Two parameters (Linear 2:4, conv 1:8) with their gradients and kept codes, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    shapes, patterns = [(4, 8), (2, 8, 3)], [(2, 4), (1, 8)]
    params, grads, codes = [], [], []
    for shape, (n, m) in zip(shapes, patterns, strict=True):
        mask = random_nm_mask(torch.Size(shape).numel() // m, n, m, gen)
        params.append(torch.randn(shape, generator=gen) * blocks_to_param(mask, shape))
        grads.append(torch.randn(shape, generator=gen))
        codes.append(encode_kept(mask, n))
    return params, grads, codes, [2, 1]


@pytest.mark.parametrize("config", SGD_CONFIGS)
def test_sgd_op_on_cpu_is_the_cpu_path_bit_for_bit(config):
    # m differs per parameter in _cpu_group, so step each parameter with its own m.
    params, grads, codes, counts = _cpu_group()
    for i, m in enumerate((4, 8)):
        mine, theirs = params[i].clone(), params[i].clone()
        b_mine, b_theirs = [None], [None]
        for _ in range(2):
            ops.kept_sgd_([mine], [grads[i]], b_mine, [codes[i]], [counts[i]], m=m, lr=0.1,
                          **config)
            kept_sgd([theirs], [grads[i]], b_theirs, [codes[i]], [counts[i]], m=m, lr=0.1,
                     fused=False, **config)
        assert torch.equal(mine, theirs) and torch.equal(b_mine[0], b_theirs[0])


def test_adamw_op_on_cpu_is_the_eager_path_bit_for_bit():
    params, grads, codes, counts = _cpu_group(seed=1)
    p, g, code, n = params[0], grads[0], codes[0], counts[0]
    states = [[p.clone()] + [torch.zeros(p.numel() // 4, n) for _ in range(3)]
              + [torch.tensor(0.0)] for _ in range(2)]
    hyper = dict(m=4, amsgrad=True, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=1e-2,
                 eps=1e-8, maximize=False)
    for update, (w, ma, va, vmax, step) in zip((ops.kept_adamw_, kept_adamw), states,
                                               strict=True):
        for _ in range(2):
            update([w], [g], [ma], [va], [vmax], [step], [code], [n], **hyper)
    for mine, theirs in zip(*states, strict=True):
        assert torch.equal(mine, theirs)


def test_op_wrappers_write_back_state_the_kernels_cannot_write_in_place():
    params, grads, codes, counts = _cpu_group(seed=5)
    p, g, code, n = params[0], grads[0], codes[0], counts[0]
    k = p.numel() // 4
    config = SGD_CONFIGS[0]
    strided = torch.randn(n, k).t()  # [k, n], not contiguous
    mine, theirs, expected = p.clone(), p.clone(), [strided.contiguous()]
    buffers = [strided]
    ops.kept_sgd_([mine], [g], buffers, [code], [n], m=4, lr=0.1, **config)
    kept_sgd([theirs], [g], expected, [code], [n], m=4, lr=0.1, fused=False, **config)
    assert buffers[0] is strided and torch.equal(strided, expected[0])
    assert torch.equal(mine, theirs)
    moments = [torch.rand(n, k).t() for _ in range(3)]
    copies = [t.contiguous() for t in moments]
    hyper = dict(m=4, amsgrad=True, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=1e-2,
                 eps=1e-8, maximize=False)
    ops.kept_adamw_([mine], [g], *([t] for t in moments), [torch.tensor(0.0)], [code], [n],
                    **hyper)
    kept_adamw([theirs], [g], *([t] for t in copies), [torch.tensor(0.0)], [code], [n], **hyper)
    assert all(torch.equal(a, b) for a, b in zip(moments, copies, strict=True))
    assert torch.equal(mine, theirs)


def _sgd_op_args():
    params, grads, codes, counts = _cpu_group(seed=2)
    params, grads, codes, counts = params[:1], grads[:1], codes[:1], counts[:1]
    buffers = [torch.randn(params[0].numel() // 4, counts[0])]
    kwargs = dict(m=4, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=True,
                  maximize=False)
    return (params, grads, buffers, codes, counts, [False]), kwargs


def test_opcheck_sgd_op():
    args, kwargs = _sgd_op_args()
    torch.library.opcheck(torch.ops.bame_optim.kept_sgd_.default, args, kwargs)


def test_opcheck_adamw_op():
    params, grads, codes, counts = _cpu_group(seed=3)
    p = params[0]
    moments = [[torch.rand(p.numel() // 4, counts[0])] for _ in range(3)]
    args = (params[:1], grads[:1], *moments, [torch.tensor(2.0)], codes[:1], counts[:1])
    kwargs = dict(m=4, amsgrad=True, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=1e-2,
                  eps=1e-8, maximize=False)
    torch.library.opcheck(torch.ops.bame_optim.kept_adamw_.default, args, kwargs)


def test_fake_impl_checks_lengths():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, kwargs = _sgd_op_args()
    with FakeTensorMode() as mode:
        fake = [[mode.from_tensor(t) for t in arg] if isinstance(arg[0], torch.Tensor) else arg
                for arg in args]
        torch.ops.bame_optim.kept_sgd_(*fake, **kwargs)  # shapes only: nothing to compute
        fake[2] = []
        with pytest.raises(ValueError, match="momentum_buffers: 0 entries for 1 params"):
            torch.ops.bame_optim.kept_sgd_(*fake, **kwargs)


def test_compiled_step_calls_the_op_without_graph_break():
    import torch._dynamo

    (params, grads, buffers, codes, counts, _), kwargs = _sgd_op_args()

    def step(params, grads, buffers):
        ops.kept_sgd_(params, grads, buffers, codes, counts, **kwargs)
        params[0].mul_(1.0)  # a neighbour op that must land in the same graph

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)([p.clone() for p in params], grads,
                                            [b.clone() for b in buffers])
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    eager_p, eager_b = [p.clone() for p in params], [b.clone() for b in buffers]
    step(eager_p, grads, eager_b)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    comp_p, comp_b = [p.clone() for p in params], [b.clone() for b in buffers]
    compiled(comp_p, grads, comp_b)
    assert torch.equal(comp_p[0], eager_p[0]) and torch.equal(comp_b[0], eager_b[0])
    assert not torch.equal(comp_p[0], params[0])  # the compiled step did write in place


def test_compiled_adamw_step_calls_the_op_without_graph_break():
    import torch._dynamo

    params, grads, codes, counts = _cpu_group(seed=3)
    hyper = dict(m=4, amsgrad=True, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=1e-2,
                 eps=1e-8, maximize=False)
    moments = [[torch.rand(params[0].numel() // 4, counts[0])] for _ in range(3)]

    def step(params, moments, steps):
        ops.kept_adamw_(params, grads[:1], *moments, steps, codes[:1], counts[:1], **hyper)
        params[0].mul_(1.0)  # a neighbour op that must land in the same graph

    def fresh():
        return [params[0].clone()], [[m[0].clone()] for m in moments], [torch.tensor(2.0)]

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(*fresh())
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    eager, compiled = fresh(), fresh()
    step(*eager)
    torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled)
    (mine, mine_moments, mine_steps), (theirs, their_moments, their_steps) = compiled, eager
    assert torch.equal(mine[0], theirs[0]) and not torch.equal(mine[0], params[0])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(mine_moments, their_moments, strict=True))
    assert mine_steps[0].item() == their_steps[0].item() == 3


def test_the_cuda_route_checks_trace_without_a_graph_break(monkeypatch):
    # What torch.compile traces before the op on CUDA (ops.usable: triton_kept.available and
    # supports per parameter), here with CPU tensors passing as CUDA ones would: fullgraph=True
    # fails on a graph break (is_neg() was one).
    import torch._dynamo

    monkeypatch.setattr(triton_kept, "interpreting", lambda: True)
    params, grads, _, _ = _cpu_group(seed=6)
    conv = torch.randn(4, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    params, grads = [*params, conv], [*grads, torch.randn(4, 8, 3, 3)]

    def checks(params, grads):
        ok = triton_kept.available() and all(
            triton_kept.supports(p, g) for p, g in zip(params, grads, strict=True))
        return params[0] * 1, ok

    torch._dynamo.reset()
    compiled = torch.compile(checks, fullgraph=True, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. dynamo's warning about an lru_cache wrapper
        assert compiled(params, grads)[1] is True
        assert compiled(params, [*grads[:2], grads[2].double()])[1] is False


def test_ops_not_usable_for_cpu_tensors():
    params, grads, _, _ = _cpu_group()
    if not triton_kept.interpreting():
        assert not triton_kept.supports(params[0], grads[0])
    assert not ops.usable(params, grads, None)
    with pytest.raises(ValueError, match="Invalid fused value: True"):
        ops.usable(params, grads, True)


def _cuda_linear(seed):
    """The 2:4 Linear parameter of :func:`_cpu_group`, its gradient and kept code, on CUDA."""
    params, grads, codes, _ = _cpu_group(seed=seed)
    return (t.to(torch.device("cuda")) for t in (params[0], grads[0], codes[0]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_functional_step_runs_the_op_and_compiles():
    p, g, code = _cuda_linear(seed=4)
    config = SGD_CONFIGS[0]
    fused, eager = p.clone(), p.clone()
    b_fused, b_eager = [None], [None]
    for _ in range(2):
        kept_sgd([fused], [g], b_fused, [code], [2], m=4, lr=0.1, fused=True, **config)
        kept_sgd([eager], [g], b_eager, [code], [2], m=4, lr=0.1, fused=False, **config)
    _assert_near(fused, eager)
    _assert_near(b_fused[0], b_eager[0])

    def step(params, buffers):
        kept_sgd(params, [g], buffers, [code], [2], m=4, lr=0.1, **config)

    compiled = torch.compile(step, fullgraph=True)
    mine, mine_b = [fused.clone()], [b_fused[0].clone()]
    theirs, theirs_b = [fused.clone()], [b_fused[0].clone()]
    compiled(mine, mine_b)
    step(theirs, theirs_b)
    assert torch.equal(mine[0], theirs[0]) and torch.equal(mine_b[0], theirs_b[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_of_the_kept_step_is_refused():
    p, g, code = _cuda_linear(seed=5)
    buffers = [None]
    kept_sgd([p], [g], buffers, [code], [2], m=4, lr=0.1, fused=True, **SGD_CONFIGS[0])
    before = p.clone()
    graph = torch.cuda.CUDAGraph()
    with (pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"),
          torch.cuda.graph(graph)):
        kept_sgd([p], [g], buffers, [code], [2], m=4, lr=0.1, fused=True, **SGD_CONFIGS[0])
    assert torch.equal(p, before)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amsgrad", [False, True])
def test_cuda_bame_adamw_steps_match_the_cpu(amsgrad):
    from bame_optim import BAMEAdamW

    def run(device: str) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [
            torch.randn(32, 64, generator=gen).to(device).requires_grad_(),
            torch.randn(16, 32, 3, 3, generator=gen).to(device).requires_grad_(),
        ]
        opt = BAMEAdamW(params, lr=1e-2, weight_decay=0.05, amsgrad=amsgrad, n=2, m=4, t_i=0,
                        t_f=0)
        for _ in range(4):  # step 0 draws the mask; the rest are ordinary (Triton) steps
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device)
            opt.step()
        return [p.detach().cpu() for p in params] + [opt.exp_avg(p).cpu() for p in params]

    for a, b in zip(run("cuda"), run("cpu"), strict=True):
        _assert_near(a, b)
