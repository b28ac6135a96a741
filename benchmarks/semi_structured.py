"""Speed of the 2:4 semi-structured kernels (``bame_optim.kernels.semi_structured``) on CUDA.

Part 1: the Linear GEMMs of DeiT-small (dim 384, MLP 1536) and DeiT-base (dim 768, MLP 3072) at
training token counts (batch 256 x 197 tokens = 50432 rows): attention ``qkv`` and ``proj``,
MLP ``fc1`` and ``fc2``; the forward product ``Y = X Wᵀ`` and the input-gradient product
``dX = dY W`` (weights with a transposable 2:4 mask, so both orientations pack), dense vs 2:4,
float16 and bfloat16; median of CUDA-event timings after warm-up.

Part 2: one whole DeiT-small training step (bfloat16 autocast, float32 weights, BAMESGD with a
static 2:4 mask), dense kernels vs ``attach_semi_structured``
(bame_optim.kernels.semi_structured_training) with the input gradient exact (dense: BAME's
masks are not transposable) and with ``W ⊙ T``.
Only the MLP ``fc1``/``fc2`` layers can run on 2:4 kernels there: torchvision's attention keeps
its ``in_proj_weight`` as a bare parameter (not an ``nn.Linear``) and reads ``out_proj.weight``
without calling ``out_proj``; the patch embedding is a convolution and the classifier is dense.

::

    .venv/bin/python -m benchmarks.semi_structured               # needs a CUDA GPU, sm80+
    .venv/bin/python -m benchmarks.semi_structured --no-step --dtypes bfloat16

Without CUDA it prints one line saying that nothing can be measured and exits 0.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

from bame_optim import BAMESGD, nm_param_groups
from bame_optim.core.transposable import transposable_mask
from bame_optim.kernels.semi_structured import (
    KernelChooser,
    cuda_time_ms,
    pack_semi_structured,
)
from bame_optim.kernels.semi_structured_training import attach_semi_structured

MODELS = {"deit_small": (384, 1536), "deit_base": (768, 3072)}
"""(embedding dim, MLP dim) of DeiT-S and DeiT-B (Touvron et al. 2021, Table 1)."""
TOKENS = 197
"""196 patches of 16x16 in a 224x224 image, plus the class token."""
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
NO_CUDA = (
    "semi_structured benchmark: no CUDA device, nothing can be measured "
    "(the 2:4 kernels need CUDA sm80+)"
)


def layer_shapes(dim: int, mlp: int) -> list[tuple[str, int, int]]:
    """``(layer, out, in)`` of one transformer block's Linear layers."""
    return [("qkv", 3 * dim, dim), ("proj", dim, dim), ("fc1", mlp, dim), ("fc2", dim, mlp)]


def time_layer(rows: int, out_f: int, in_f: int, dtype: torch.dtype, args) -> dict[str, tuple]:
    """``{op: (dense_ms, sparse_ms)}`` of one layer shape with a transposable 2:4 weight."""
    generator = torch.Generator("cuda").manual_seed(0)
    w = torch.randn(out_f, in_f, generator=generator, device="cuda", dtype=dtype)
    w = w * transposable_mask(w)
    x = torch.randn(rows, in_f, generator=generator, device="cuda", dtype=dtype)
    g = torch.randn(rows, out_f, generator=generator, device="cuda", dtype=dtype)
    packed, packed_t = pack_semi_structured(w), pack_semi_structured(w.T.contiguous())
    ops = {
        "forward": (lambda: F.linear(x, w), lambda: F.linear(x, packed)),
        "input_grad": (lambda: g @ w, lambda: F.linear(g, packed_t)),
    }
    times = {}
    with torch.no_grad():
        for op, (dense, sparse) in ops.items():
            times[op] = (
                cuda_time_ms(dense, args.warmup, args.repeats),
                cuda_time_ms(sparse, args.warmup, args.repeats),
            )
    return times


def gemm_rows(args: argparse.Namespace) -> list[dict]:
    rows = args.batch * TOKENS
    table = []
    for model in args.models:
        for layer, out_f, in_f in layer_shapes(*MODELS[model]):
            for dtype_name in args.dtypes:
                times = time_layer(rows, out_f, in_f, DTYPES[dtype_name], args)
                for op, (dense_ms, sparse_ms) in times.items():
                    k, n = (in_f, out_f) if op == "forward" else (out_f, in_f)
                    table.append(
                        dict(
                            model=model,
                            layer=layer,
                            gemm=f"{rows}x{k}->{n}",
                            dtype=dtype_name,
                            op=op,
                            dense_ms=dense_ms,
                            sparse_ms=sparse_ms,
                        )
                    )
    return table


STEP_CONFIGS = (("dense kernels", None), ("2:4 fwd", "exact"), ("2:4 fwd+dX W⊙T", "transposable"))
"""Whole-step configurations: no hooks, 2:4 forward (exact dense dX), 2:4 forward and dX."""


def time_step(args: argparse.Namespace, mode: str | None, images, labels) -> dict:
    """Median time of one DeiT-small training step and how many Linear layers ran on 2:4."""
    from bame_apps.integrations.models import deit_small

    torch.manual_seed(0)
    model = deit_small().cuda()
    opt = BAMESGD(
        nm_param_groups(model, 2, 4),
        lr=0.01,
        momentum=0.9,
        n=2,
        m=4,
        total_steps=1000,
        t_i=0,
        t_f=0,
    )
    training = None
    if mode is not None:
        chooser = KernelChooser(min_speedup=0.0 if args.force_sparse else 1.0)
        training = attach_semi_structured(model, opt, chooser=chooser, input_grad=mode)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = cuda_time_ms(step, warmup=3, repeats=args.step_repeats)
    linears = sum(isinstance(mod, nn.Linear) for mod in model.modules())
    fwd = dx = 0
    if training is not None:
        plans = list(training.plans.values())
        fwd = sum(plan.forward.startswith("sparse") for plan in plans)
        dx = sum(plan.input_grad.startswith("sparse") for plan in plans)
        if args.verbose:
            print(training)
        training.remove()
    return dict(ms=ms, layers=f"fwd {fwd}/{linears}, dX {dx}/{linears}")


def step_rows(args: argparse.Namespace) -> list[dict]:
    generator = torch.Generator("cuda").manual_seed(0)
    images = torch.randn(args.step_batch, 3, 224, 224, generator=generator, device="cuda")
    labels = torch.randint(0, 1000, (args.step_batch,), generator=generator, device="cuda")
    table = []
    for label, mode in STEP_CONFIGS:
        table.append(dict(config=label, **time_step(args, mode, images, labels)))
        torch.cuda.empty_cache()
    return table


def format_gemms(table: list[dict]) -> str:
    head = f"{'model':<11}{'layer':<6}{'GEMM rows x in -> out':<24}{'dtype':<10}{'op':<12}"
    head += f"{'dense ms':>10}{'2:4 ms':>10}{'speed-up':>10}"
    lines = [head]
    for r in table:
        lines.append(
            f"{r['model']:<11}{r['layer']:<6}{r['gemm']:<24}{r['dtype']:<10}{r['op']:<12}"
            f"{r['dense_ms']:>10.3f}{r['sparse_ms']:>10.3f}{r['dense_ms'] / r['sparse_ms']:>9.2f}x"
        )
    return "\n".join(lines)


def format_steps(table: list[dict]) -> str:
    base = table[0]["ms"]
    lines = [f"{'DeiT-small step':<20}{'ms':>10}{'speed-up':>10}  Linear layers on 2:4"]
    for r in table:
        lines.append(f"{r['config']:<20}{r['ms']:>10.2f}{base / r['ms']:>9.2f}x  {r['layers']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=list(DTYPES))
    parser.add_argument("--batch", type=int, default=256, help="images per GEMM (x197 tokens)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-step", action="store_true", help="skip the DeiT-small step")
    parser.add_argument("--step-batch", type=int, default=256)
    parser.add_argument("--step-repeats", type=int, default=10)
    parser.add_argument(
        "--force-sparse", action="store_true", help="2:4 wherever supported, even if slower"
    )
    parser.add_argument("--verbose", action="store_true", help="print every layer's plan")
    args = parser.parse_args(argv)
    for name in ("batch", "repeats", "step_batch", "step_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return {}
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        print(
            f"semi_structured benchmark: compute capability {capability} < (8, 0), "
            "nothing can be measured"
        )
        return {}
    print(
        f"{torch.cuda.get_device_name()} (sm{capability[0]}{capability[1]}), "
        f"torch {torch.__version__}, cuSPARSELt {torch.backends.cusparselt.version()}"
    )
    results = {"gemms": gemm_rows(args)}
    print(format_gemms(results["gemms"]))
    if not args.no_step:
        results["steps"] = step_rows(args)
        print(format_steps(results["steps"]))
    return results


if __name__ == "__main__":
    main()
