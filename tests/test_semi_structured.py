"""2:4 semi-structured kernels: run-time choice, the autograd Function, inference export and
opt-in training hooks. On CPU everything takes the masked dense path and must equal it; the
CUDA tests (skipped without a GPU) compare the packed path with the dense one in fp16/bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from bame_optim.core.nm import top_n_mask
from bame_optim.core.transposable import is_transposable_24, transposable_mask
from bame_optim.kernels import semi_structured_training
from bame_optim.kernels.semi_structured import (
    KernelChoice,
    KernelChooser,
    check_export,
    device_backend,
    export_semi_structured,
    pack_semi_structured,
    support_reason,
)
from bame_optim.kernels.semi_structured_training import (
    LinearKernels,
    SemiStructuredLinearFunction,
    attach_semi_structured,
    semi_structured_linear,
)
from benchmarks import semi_structured as benchmark
from tests.strategies import seeded_tensor, seeds

CUDA_SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
needs_sm80 = pytest.mark.skipif(not CUDA_SM80, reason="2:4 kernels need a CUDA GPU with sm80+")


def row_24(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with the 2 largest |w| kept in every block of 4 along dim 1."""
    blocks = weight.reshape(-1, 4)
    keep = torch.zeros_like(blocks, dtype=torch.bool)
    keep.scatter_(1, blocks.abs().topk(2, dim=1).indices, True)
    return (blocks * keep).reshape(weight.shape)


def sparse_mlp(dtype=torch.float64, device="cpu", transposable=False, dims=(32, 64, 16)):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(dims[0], dims[1]), nn.GELU(), nn.Linear(dims[1], dims[2]))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            w = layer.weight
            w.copy_(w * transposable_mask(w) if transposable else row_24(w))
    return model.to(device=device, dtype=dtype)


# ---------------------------------------------------------------- support rules (pure)


def test_device_backend_rules():
    assert device_backend("cpu", None, False) == (None, "device cpu: the 2:4 kernels need CUDA")
    backend, reason = device_backend("cuda", (7, 5), True)
    assert backend is None and "compute capability (7, 5)" in reason
    assert device_backend("cuda", (8, 0), True) == ("cusparselt", None)
    assert device_backend("cuda", (9, 0), True) == ("cusparselt", None)
    assert device_backend("cuda", (8, 6), False) == ("cutlass", None)
    assert device_backend("cuda", (8, 0), True, force_cutlass=True) == ("cutlass", None)
    backend, reason = device_backend("cuda", (9, 0), False)
    assert backend is None and "CUTLASS needs sm8x" in reason


def test_support_reason_rules():
    assert support_reason((16, 16), torch.float16, "cusparselt") is None
    assert support_reason((3072, 768), torch.bfloat16, "cusparselt") is None
    assert "dtype torch.float32" in support_reason((16, 16), torch.float32, "cusparselt")
    assert "multiples of (16, 16)" in support_reason((24, 16), torch.float16, "cusparselt")
    assert "multiples of (16, 16)" in support_reason((16, 8), torch.float16, "cusparselt")
    assert "multiples of (32, 64)" in support_reason((32, 32), torch.float16, "cutlass")
    assert support_reason((32, 64), torch.float16, "cutlass") is None
    assert "2-D" in support_reason((16,), torch.float16, "cusparselt")


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("weight", "backend", "match"),
    [
        (torch.zeros(16, 16), None, "Invalid weight dtype: torch.float32"),
        (torch.zeros(16, dtype=torch.float16), None, "Invalid weight shape"),
        (torch.zeros(16, 16, dtype=torch.float16), None, "Invalid weight device: cpu"),
        (torch.zeros(24, 16, dtype=torch.float16), "cusparselt", r"weight shape: \(24, 16\)"),
        (torch.ones(16, 16, dtype=torch.float16), "cusparselt", "Invalid weight value: not 2:4"),
        (torch.zeros(16, 16, dtype=torch.float16), "cuda", "Invalid backend value: 'cuda'"),
    ],
)
def test_pack_rejects_bad_inputs(weight, backend, match):
    with pytest.raises(ValueError, match=match):
        pack_semi_structured(weight, backend)


def test_other_bad_arguments_raise():
    with pytest.raises(ValueError, match="Invalid min_speedup value: -1"):
        KernelChooser(min_speedup=-1)
    with pytest.raises(ValueError, match="Invalid warmup/repeats value"):
        KernelChooser(repeats=0)
    w = torch.zeros(8, 16)
    with pytest.raises(ValueError, match=r"Invalid input shape: \(2, 8\)"):
        semi_structured_linear(torch.zeros(2, 8), w)
    with pytest.raises(ValueError, match=r"Invalid bias shape: \(16,\)"):
        semi_structured_linear(torch.zeros(2, 16), w, torch.zeros(16))
    with pytest.raises(ValueError, match="Invalid weight shape"):
        semi_structured_linear(torch.zeros(2, 16), torch.zeros(16))
    model = sparse_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Invalid input_grad value: 'fast'"):
        attach_semi_structured(model, opt, input_grad="fast")
    with pytest.raises(ValueError, match="Invalid optimizer value: list"):
        attach_semi_structured(model, [], input_grad="exact")


# ---------------------------------------------------------------- chooser


def test_chooser_never_picks_sparse_on_cpu_and_says_why():
    chooser = KernelChooser()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        choice = chooser.choose(50432, (1536, 384), dtype, "cpu")
        assert not choice.sparse
        assert choice.reason == "device cpu: the 2:4 kernels need CUDA"
        assert choice.dense_ms is None and choice.sparse_ms is None
    assert len(chooser.choices) == 3
    assert chooser.choose(50432, (1536, 384), torch.float16, "cpu") is next(
        iter(chooser.choices.values())
    )
    assert KernelChooser().choices == {}, "the cache belongs to the instance"


# ---------------------------------------------------------------- autograd Function (fallback)


def reference_grads(x, weight, bias, grad_out, backward_weight=None):
    """The dense masked math: autograd of F.linear, dX through ``backward_weight``."""
    x_ref = x.detach().clone().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    b_ref = None if bias is None else bias.detach().clone().requires_grad_()
    y = F.linear(x_ref, w_ref, b_ref)
    y.backward(grad_out)
    grad_x = x_ref.grad
    if backward_weight is not None:
        grad_x = grad_out @ backward_weight
    return y.detach(), grad_x, w_ref.grad, None if b_ref is None else b_ref.grad


@given(
    seed=seeds,
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    dims=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    bias=st.booleans(),
    masked_backward=st.booleans(),
)
def test_fallback_equals_dense_masked_math(seed, lead, dims, bias, masked_backward):
    out_f, in_f = 4 * dims[0], 4 * dims[1]
    weight = row_24(seeded_tensor((out_f, in_f), seed)).requires_grad_()
    b = seeded_tensor((out_f,), seed + 1).requires_grad_() if bias else None
    x = seeded_tensor((*lead, in_f), seed + 2).requires_grad_()
    grad_out = seeded_tensor((*lead, out_f), seed + 3)
    backward_weight = weight.detach() * transposable_mask(weight) if masked_backward else None
    kernels = LinearKernels(backward_weight=backward_weight)

    y = semi_structured_linear(x, weight, b, kernels)
    y.backward(grad_out)
    expected = reference_grads(x, weight, b, grad_out, backward_weight)
    torch.testing.assert_close(y, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, expected[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight.grad, expected[2], rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(b.grad, expected[3], rtol=1e-12, atol=1e-12)


def test_fallback_passes_gradcheck():
    weight = row_24(seeded_tensor((8, 12), 0)).requires_grad_()
    bias = seeded_tensor((8,), 1).requires_grad_()
    x = seeded_tensor((2, 3, 12), 2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b: semi_structured_linear(x, w, b), (x, weight, bias)
    )


def test_fallback_casts_like_autocast():
    """Kernels in bfloat16 with float32 inputs: the output is bfloat16 and the gradients come
    back in the inputs' dtypes, as autocast does for F.linear."""
    weight = row_24(torch.randn(16, 32)).requires_grad_()
    bias = torch.randn(16, requires_grad=True)
    x = torch.randn(5, 32, requires_grad=True)
    y = SemiStructuredLinearFunction.apply(x, weight, bias, LinearKernels(dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(x, weight, bias)
    torch.testing.assert_close(y, expected)
    y.float().sum().backward()
    assert (x.grad.dtype, weight.grad.dtype, bias.grad.dtype) == (torch.float32,) * 3


# ---------------------------------------------------------------- export (CPU: nothing packed)


class WithUnused(nn.Module):
    """``mlp`` is called by ``forward``, ``unused`` is not."""

    def __init__(self, mlp: nn.Module, unused: nn.Module) -> None:
        super().__init__()
        self.mlp, self.unused = mlp, unused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def test_export_on_cpu_converts_nothing_and_reports_why():
    model = WithUnused(sparse_mlp(torch.float16), nn.Linear(16, 16).half())
    reference = copy.deepcopy(model)
    weights = [p for p in model.parameters()]
    x = torch.randn(8, 32, dtype=torch.float16)
    report = export_semi_structured(model, x)
    assert report.converted == []
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons["mlp.0"] == reasons["mlp.2"] == "device cpu: the 2:4 kernels need CUDA"
    assert reasons["unused"] == "not called through its own forward by the example inputs"
    assert [layer.rows for layer in report.layers] == [8, 8, None]
    assert all(a is b for a, b in zip(weights, model.parameters(), strict=True))
    assert "0/3 Linear layers on 2:4 kernels" in str(report)
    assert check_export(model, reference, (x,)).ok


def test_check_export_catches_a_wrong_model():
    model = sparse_mlp(torch.float32)
    reference = copy.deepcopy(model)
    x = torch.randn(8, 32)
    assert check_export(model, reference, x).worst == 0.0
    with torch.no_grad():
        model[2].bias.add_(0.1)
    result = check_export(model, reference, x)
    assert not result.ok and result.max_abs_error == pytest.approx(0.1, rel=1e-4)
    assert check_export(model, reference, x, atol=1.0).ok


# ---------------------------------------------------------------- training hooks (CPU)


def run_step(model, x, grad_out):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(grad_out)
    return y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


def test_exact_mode_on_cpu_equals_the_plain_model():
    model = sparse_mlp(transposable=True)
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    training = attach_semi_structured(model, opt)
    x, grad_out = torch.randn(2, 3, 32, dtype=torch.float64), torch.randn(2, 3, 16).double()
    got, expected = run_step(model, x, grad_out), run_step(plain, x, grad_out)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    for a, b in zip(got[2], expected[2], strict=True):
        assert torch.equal(a, b)
    plans = training.plans
    assert set(plans) == {"0", "2"} and plans["0"].calls == 1
    assert plans["0"].forward == "dense: device cpu: the 2:4 kernels need CUDA"
    assert plans["2"].input_grad == "dense: device cpu: the 2:4 kernels need CUDA"
    opt.step()  # the post-hook refreshes; an in-place change is seen through the version
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(x)
    assert plans["0"].forward == "dense: weight is not 2:4 along the input dimension"
    training.remove()
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks
    assert not opt._optimizer_step_post_hooks


def test_transposable_mode_on_cpu_uses_w_odot_t_for_the_input_gradient():
    model = sparse_mlp()
    assert not is_transposable_24(model[0].weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = []
    model[2].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    training = attach_semi_structured(model, opt, input_grad="transposable", layers=["2"])
    assert set(training.plans) == {"2"}
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    hidden = model[1](model[0](x)).detach().requires_grad_()
    y = model[2](hidden)
    assert seen == [torch.Size([5, 16])], "hooks registered before see the real output"
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    w = model[2].weight.detach()
    expected = reference_grads(hidden, w, model[2].bias, grad_out, w * transposable_mask(w))
    torch.testing.assert_close(y.detach(), expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden.grad, expected[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[2].weight.grad, expected[2], rtol=1e-12, atol=1e-12)
    assert training.plans["2"].input_grad.startswith("dense W⊙T: device cpu")
    training.remove()


class AlwaysSparse(KernelChooser):
    """Says "sparse" for every GEMM (with the packing faked, the plumbing runs on CPU)."""

    def choose(self, rows, shape, dtype, device):
        choice = KernelChoice(True, "forced by the test", "fake")
        self.choices[(rows, shape[0], shape[1], dtype, str(device))] = choice
        return choice


@pytest.mark.parametrize("mode", ["exact", "transposable", "dense"])
def test_packed_plumbing_with_fake_packing(monkeypatch, mode):
    """Dense tensors stand in for the packed ones: the forward must use ``W`` and the input
    gradient ``W_b = W`` (transposable weights) or ``W ⊙ T``, in the right orientation."""
    packed = []

    def fake_pack(weight, backend=None):
        packed.append(tuple(weight.shape))
        return weight.clone()

    monkeypatch.setattr(semi_structured_training, "pack_semi_structured", fake_pack)
    model = sparse_mlp(transposable=mode == "exact", dims=(32, 64, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    training = attach_semi_structured(model, opt, chooser=AlwaysSparse(), input_grad=mode)
    layer = model[2]
    hidden = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    y = layer(hidden)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    w = layer.weight.detach()
    w_b = w * transposable_mask(w) if mode == "transposable" else None
    expected = reference_grads(hidden, w, layer.bias, grad_out, w_b)
    for got, want in zip((y.detach(), hidden.grad, layer.weight.grad), expected, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    plan = training.plans["2"]
    assert plan.forward == "sparse: forced by the test"
    if mode == "dense":
        assert packed == [(16, 64)] and plan.input_grad == "dense: input_grad='dense'"
    else:
        assert packed == [(16, 64), (64, 16)]
        assert plan.input_grad.startswith("sparse W⊙T" if mode == "transposable" else "sparse:")
    opt.step()  # the post-hook re-packs at once for the last call's rows and dtype
    assert len(packed) == (2 if mode == "dense" else 4)
    training.remove()


def test_training_with_bamesgd_on_cpu_runs_and_reports():
    from bame_optim import BAMESGD

    model = sparse_mlp(torch.float32)
    opt = BAMESGD(model.parameters(), lr=0.1, n=2, m=4, total_steps=10, t_i=0, t_f=0)
    training = attach_semi_structured(model, opt, input_grad="transposable")
    for _ in range(3):
        model(torch.randn(4, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert "forward:    dense: device cpu" in str(training)
    training.remove()


# ---------------------------------------------------------------- benchmark (CPU message)


def test_benchmark_without_cuda_prints_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert benchmark.main([]) == {}
    out = capsys.readouterr().out
    assert out == benchmark.NO_CUDA + "\n" and "nothing can be measured" in out
    assert [s[0] for s in benchmark.layer_shapes(384, 1536)] == ["qkv", "proj", "fc1", "fc2"]


# ---------------------------------------------------------------- CUDA (run on an sm80+ GPU)

CUDA_DTYPES = [torch.float16, torch.bfloat16]
TOL = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


@pytest.mark.cuda
@needs_sm80
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_packed_linear_matches_dense(dtype):
    w = row_24(torch.randn(128, 256, device="cuda")).to(dtype)
    x = torch.randn(3, 40, 256, device="cuda", dtype=dtype)
    bias = torch.randn(128, device="cuda", dtype=dtype)
    y = semi_structured_linear(x, w, bias, LinearKernels(forward=pack_semi_structured(w)))
    torch.testing.assert_close(y, F.linear(x, w, bias), **TOL[dtype])


@pytest.mark.cuda
@needs_sm80
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_function_sparse_gradients_match_fallback(dtype):
    w = torch.randn(64, 128, device="cuda")
    w = (w * transposable_mask(w)).to(dtype).requires_grad_()
    bias = torch.randn(64, device="cuda", dtype=dtype, requires_grad=True)
    x = torch.randn(72, 128, device="cuda", dtype=dtype, requires_grad=True)
    grad_out = torch.randn(72, 64, device="cuda", dtype=dtype)
    kernels = LinearKernels(
        forward=pack_semi_structured(w.detach()),
        input_grad=pack_semi_structured(w.detach().T.contiguous()),
    )
    results = []
    for k in (kernels, LinearKernels()):
        for t in (w, bias, x):
            t.grad = None
        y = semi_structured_linear(x, w, bias, k)
        y.backward(grad_out)
        results.append((y.detach(), x.grad, w.grad, bias.grad))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.cuda
@needs_sm80
def test_cuda_chooser_measures_and_caches():
    chooser = KernelChooser(min_speedup=0.0, warmup=1, repeats=3)
    choice = chooser.choose(1024, (256, 512), torch.float16, "cuda")
    assert choice.sparse and choice.dense_ms > 0 and choice.sparse_ms > 0, choice
    assert not chooser.choose(1024, (256, 512), torch.float32, "cuda").sparse
    assert not chooser.choose(1024, (24, 512), torch.float16, "cuda").sparse
    strict = KernelChooser(min_speedup=1e9, warmup=1, repeats=3)
    assert strict.choose(1024, (256, 512), torch.float16, "cuda").reason.startswith("dense")


@pytest.mark.cuda
@needs_sm80
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_export_converts_and_checks(dtype):
    model = sparse_mlp(dtype, "cuda", dims=(256, 512, 256)).eval()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 64, 256, device="cuda", dtype=dtype)
    report = export_semi_structured(model, x, KernelChooser(min_speedup=0.0, repeats=3))
    assert report.converted == ["0", "2"], str(report)
    assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    result = check_export(model, reference, x)
    assert result.ok, result


@pytest.mark.cuda
@needs_sm80
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_export_of_a_gpt2_model_converts_its_conv1d_projections(dtype):
    transformers = pytest.importorskip("transformers")
    from bame_optim import BAMEAdamW, nm_param_groups

    config = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=256, n_layer=1,
                                     n_head=4, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    opt = BAMEAdamW(nm_param_groups(model, 2, 4), total_steps=3, t_i=0, t_f=0)
    ids = torch.randint(0, 256, (2, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.check_nm()
    model = model.to("cuda", dtype).eval()
    reference = copy.deepcopy(model)
    x = ids.to("cuda")
    report = export_semi_structured(model, x, KernelChooser(min_speedup=0.0, repeats=3))
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"} <= set(report.converted)
    logits = model(input_ids=x).logits.double()
    expected = reference(input_ids=x).logits.double()
    assert torch.allclose(logits, expected, rtol=2e-2, atol=2e-2 * expected.abs().max())


@pytest.mark.cuda
@needs_sm80
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_training_hooks_match_dense(dtype):
    model = sparse_mlp(dtype, "cuda", transposable=True, dims=(256, 512, 256))
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    training = attach_semi_structured(model, opt, chooser=KernelChooser(min_speedup=0.0))
    x = torch.randn(2, 64, 256, device="cuda", dtype=dtype)
    grad_out = torch.randn(2, 64, 256, device="cuda", dtype=dtype)
    got, expected = run_step(model, x, grad_out), run_step(plain, x, grad_out)
    for plan in training.plans.values():
        assert plan.forward.startswith("sparse") and plan.input_grad.startswith("sparse"), plan
    torch.testing.assert_close(got[0], expected[0], **TOL[dtype])
    torch.testing.assert_close(got[1], expected[1], **TOL[dtype])
    for a, b in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])
    opt.step()  # lr=0: the weights stay, the packs are rebuilt by the post-hook
    torch.testing.assert_close(model(x), plain(x), **TOL[dtype])
    training.remove()


@pytest.mark.cuda
@needs_sm80
def test_cuda_training_under_bf16_autocast_with_fp32_weights():
    model = sparse_mlp(torch.float32, "cuda", dims=(256, 512, 256))
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    training = attach_semi_structured(
        model, opt, chooser=KernelChooser(min_speedup=0.0), input_grad="dense"
    )
    x = torch.randn(128, 256, device="cuda")
    outputs = []
    for net in (model, plain):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = net(x)
        y.float().square().sum().backward()
        outputs.append((y.detach(), [p.grad for p in net.parameters()]))
    assert outputs[0][0].dtype == torch.bfloat16
    assert training.plans["0"].forward.startswith("sparse"), training.plans["0"]
    torch.testing.assert_close(outputs[0][0], outputs[1][0], **TOL[torch.bfloat16])
    for a, b in zip(outputs[0][1], outputs[1][1], strict=True):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() <= 5e-2 * b.abs().max()
    training.remove()


def test_export_of_a_gpt2_conv1d_packs_its_transpose(monkeypatch):
    """HF Conv1D (``x @ W``, ``W [in, out]``) trained N:M along its input dimension: the export
    packs ``W.T`` (``[out, in]``, 2:4 along its rows) and gives the layer the transposed view,
    so the forward is unchanged (packing faked with a dense copy: the plumbing runs on CPU)."""
    transformers = pytest.importorskip("transformers")
    from bame_optim.kernels import semi_structured as module

    packed = []

    def fake_pack(weight, backend=None):
        packed.append(tuple(weight.shape))
        return weight.clone()

    class Supported(AlwaysSparse):
        def support(self, shape, dtype, device):
            return "fake", None

    monkeypatch.setattr(module, "pack_semi_structured", fake_pack)
    layer = transformers.pytorch_utils.Conv1D(nf=12, nx=8)  # weight [8, 12]
    with torch.no_grad():
        along_input = layer.weight.t().reshape(-1, 4)
        layer.weight.copy_((along_input * top_n_mask(along_input.abs(), 2)).reshape(12, 8).t())
    model = nn.Sequential(layer)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 5, 8)
    report = export_semi_structured(model, x, Supported())
    assert report.converted == ["0"] and packed == [(12, 8)]
    assert report.layers[0].shape == (12, 8) and report.layers[0].rows == 15
    assert torch.equal(layer.weight, reference[0].weight)
    assert check_export(model, reference, (x,)).ok
    layer.weight = nn.Parameter(reference[0].weight.detach().clone())
    with torch.no_grad():
        layer.weight[0, 0] = layer.weight[1, 0] = layer.weight[2, 0] = 1.0  # 3 of 4 in a block
    report = export_semi_structured(model, x, Supported())
    assert report.layers[0].reason == "weight is not 2:4 along the input dimension"
