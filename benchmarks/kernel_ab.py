"""The kept kernels of this checkout (A) against those of another source tree (B), in one process.

B is ``bame_optim/kernels/csrc`` at a git revision (``--against REV``) or a folder of those
sources (``--csrc DIR``), built with this checkout's compiler flags as an extension of its own
name (``<extensions cache>/bame_kernel_ab/<hash>``, once per source hash). Both modules step
their own copies of the same weights, gradients and compact state of a model's sparse weights
(all, or the 3x3 convolutions only), through the extension's ``fused_kept_sgd`` /
``fused_kept_adamw`` bindings with the same arguments, interleaved with torch's fused step on
dense copies; the order rotates every round, so slow phases of the machine hit all three.
An A/B in one process on the same tensors is what tells a kernel change of a few percent from
run-to-run noise (``benchmarks.step``'s ratios move by +-0.15 between runs). B's bindings must
take this checkout's arguments.

It prints per model, pattern and rule the median milliseconds with the interquartile range,
and ``A/torch``, ``B/torch`` and ``A/B``. Run from the repository root::

    .venv/bin/python -m benchmarks.kernel_ab --against HEAD~1 --models resnet50 --layers 3x3
    .venv/bin/python -m benchmarks.kernel_ab --csrc /tmp/csrc --patterns 1:16 --threads 1

``--shapes`` times given weight shapes instead of a model's (``256x256x3x3*4``: four such
weights): a few small weights stay in the caches, so a kernel's own cost shows apart from
the memory's (on ResNet-50's 3x3 shapes at 2:4 the AVX-512 tiles took about as long per
weight from L3 as from DRAM at one thread: they are bound by their instructions there)::

    .venv/bin/python -m benchmarks.kernel_ab --against HEAD --shapes 128x128x3x3*4 --threads 1

``--channels-last`` puts A's convolution weights and gradients in the channels-last memory
format, whose N:M blocks are contiguous rows; torch's and B's stay contiguous (torch's fused
step is about 2.4x slower on channels_last weights: its fastest layout is the baseline). With
B this checkout's own sources, A/B is then the kernels' channels-last time over their
contiguous one::

    .venv/bin/python -m benchmarks.kernel_ab --csrc bame_optim/kernels/csrc --channels-last
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from bame_optim.core.kept import encode_kept
from bame_optim.core.nm import random_nm_mask
from bame_optim.kernels import kept_adamw_cpu, kept_sgd_cpu, native

from .harness import (
    ADAMW_HYPER,
    SGD_HYPER,
    Timer,
    in_channels_last,
    interleaved_rounds,
    machine,
    nm_pattern,
    require_at_least,
)
from .kept_simd_ab import shapes_of, summary

ROOT = Path(__file__).resolve().parents[1]
CSRC = "bame_optim/kernels/csrc"
CONTENDERS = ("torch", "A", "B")
BUILD_NAME = "bame_kernel_ab"


def sources_at(revision: str, into: Path) -> Path:
    """``bame_optim/kernels/csrc`` at git ``revision``, extracted under ``into``."""
    done = subprocess.run(["git", "archive", revision, CSRC], cwd=ROOT, capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"Invalid --against value: {revision!r} "
                         f"({done.stderr.decode().strip()})")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        archive.extractall(into, filter="data")
    return into / CSRC


def build(folder: Path) -> ModuleType:
    """The extension of the ``.cpp`` files in ``folder`` (headers from there too), under a name
    of its own keyed by the sources and this checkout's flags; the sources are copied into its
    build folder, so a later run of the same sources finds it built."""
    paths = sorted(p for p in folder.iterdir() if p.suffix in (".cpp", ".h"))
    if not any(p.suffix == ".cpp" for p in paths):
        raise SystemExit(f"Invalid sources folder: {folder} holds no .cpp file")
    key = native.sources_hash(paths=paths)
    root = native.build_directory(key).parents[1]  # the extensions cache native builds in
    directory = root / BUILD_NAME / key
    sources = directory / "csrc"
    sources.mkdir(parents=True, exist_ok=True)
    for path in paths:
        (sources / path.name).write_bytes(path.read_bytes())
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=f"{BUILD_NAME}_{key}",
        sources=[str(sources / p.name) for p in paths if p.suffix == ".cpp"],
        extra_cflags=native.flags(), extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(sources)], build_directory=str(directory), verbose=False,
    )


def steps(modules: dict[str, ModuleType], shapes: list[torch.Size], n: int, m: int,
          rule: str, channels_last: bool = False) -> dict[str, Callable[[], None]]:
    """One step of torch's fused optimizer and of each module, each on its own copy of the
    same weights and state (momentum, or moments at step 5); with ``channels_last`` module
    A's 4-D and 5-D weights and gradients in that memory format (torch's and B's stay
    contiguous)."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]

    def own(name: str, t: torch.Tensor) -> torch.Tensor:  # module ``name``'s copy's layout
        return in_channels_last(t) if channels_last and name == "A" else t

    grads_of = {name: [own(name, g) for g in grads] for name in modules}
    kept = [encode_kept(random_nm_mask(p.numel() // m, n, m, gen), n) for p in base]
    counts = [n] * len(base)
    tables, codes = kept_sgd_cpu.tables_for(kept, counts, m)
    fma, wide = kept_sgd_cpu.fma(), native.avx512_allowed()
    state = [torch.rand(p.numel() // m, n, generator=gen) for p in base]
    weights = [p.clone() for p in base]
    calls: dict[str, Callable[[], None]] = {}
    if rule == "sgd":
        h = SGD_HYPER
        dense = [torch.rand_like(p) for p in base]
        calls["torch"] = lambda: sgd(weights, grads, dense, fused=True, foreach=False, **h)
        for name, module in modules.items():
            ws, buffers = [own(name, p.clone()) for p in base], [s.clone() for s in state]
            calls[name] = (lambda module=module, ws=ws, gs=grads_of[name], buffers=buffers:
                           module.fused_kept_sgd(ws, gs, buffers, kept, tables, codes, m,
                                                 h["lr"], h["momentum"], h["dampening"],
                                                 h["weight_decay"], h["nesterov"],
                                                 h["maximize"], fma, wide))
        return calls
    h = ADAMW_HYPER
    dense_moments = [torch.zeros_like(p) for p in base], [torch.rand_like(p) for p in base]
    dense_steps = [torch.tensor(5.0) for _ in base]
    calls["torch"] = lambda: adamw(weights, grads, *dense_moments, [], dense_steps, fused=True,
                                   foreach=False, **h)
    step = 6.0  # the bias corrections of a fixed step: timing only
    sizes = [h["lr"] / (1 - h["beta1"] ** step)] * len(base)
    roots = [(1 - h["beta2"] ** step) ** 0.5] * len(base)
    addcmul = kept_adamw_cpu.fma_addcmul()
    for name, module in modules.items():
        ws = [own(name, p.clone()) for p in base]
        m1, m2 = [s.clone() for s in state], [s * 0.5 for s in state]
        calls[name] = (lambda module=module, ws=ws, gs=grads_of[name], m1=m1, m2=m2:
                       module.fused_kept_adamw(ws, gs, m1, m2, [], kept, tables, counts, sizes,
                                               roots, m, h["lr"], h["beta1"], h["beta2"],
                                               h["weight_decay"], h["eps"], h["amsgrad"],
                                               h["maximize"], fma, addcmul, wide))
    return calls


def weight_shapes(text: str) -> list[torch.Size]:
    """``AxBx...`` (one weight of that shape) or ``AxBx...*K`` (K of them), for ``--shapes``."""
    spec, _, copies = text.partition("*")
    try:
        dims = [int(d) for d in spec.split("x")]
        count = int(copies) if copies else 1
    except ValueError:
        dims, count = [], 0
    if len(dims) < 2 or min(dims) < 1 or count < 1:
        raise argparse.ArgumentTypeError(
            f"Invalid --shapes value: {text!r} (want AxB[x...] or AxB[x...]*K, every number "
            "at least 1)")
    return [torch.Size(dims)] * count


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    other = parser.add_mutually_exclusive_group(required=True)
    other.add_argument("--against", metavar="REV", help="B: csrc at this git revision")
    other.add_argument("--csrc", type=Path, metavar="DIR", help="B: the sources in DIR")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--models", nargs="+", default=["resnet50"])
    weights.add_argument("--shapes", nargs="+", type=weight_shapes, metavar="SHAPE",
                         help="weights of these shapes instead of a model's: AxB[x...][*K]")
    parser.add_argument("--patterns", nargs="+", type=nm_pattern, default=[(2, 4), (1, 16)])
    parser.add_argument("--rules", nargs="+", choices=("sgd", "adamw"), default=["sgd", "adamw"])
    parser.add_argument("--layers", choices=("3x3", "all"),
                        help="which of a model's sparse weights: all (default) or the 3x3 "
                        "convolutions")
    parser.add_argument("--channels-last", action="store_true",
                        help="A's 4-D and 5-D weights in channels-last memory format (torch's "
                        "and B's stay contiguous)")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    require_at_least(parser, args, {"rounds": 2, "warmup": 0, "threads": 1})
    if args.csrc is not None and not args.csrc.is_dir():
        parser.error(f"Invalid --csrc value: {args.csrc} is not a folder")
    if args.shapes is not None and args.layers is not None:
        parser.error("Invalid --layers value: --layers chooses among a model's weights, and "
                     "--shapes gives the weights themselves")
    args.layers = args.layers or "all"
    for shape in {s for group in args.shapes or () for s in group}:
        for n, m in args.patterns:
            if shape[1] % m:
                parser.error(f"Invalid --shapes value: {'x'.join(map(str, shape))} (dim 1, "
                             f"{shape[1]}, is not a multiple of M = {m} of {n}:{m})")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Build B, time every (model, pattern, rule), print one line each; the medians."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not (kept_sgd_cpu.available() and kept_adamw_cpu.available()):
        raise SystemExit(f"the kept kernels are unavailable: {kept_sgd_cpu.error()}")
    with tempfile.TemporaryDirectory(prefix="bame_kernel_ab_") as tmp:
        folder = args.csrc or sources_at(args.against, Path(tmp))
        modules = {"A": native.load(), "B": build(folder)}
    weights = (f"layers {args.layers}" if args.shapes is None else "shapes " + " ".join(
        f"{'x'.join(map(str, group[0]))}*{len(group)}" for group in args.shapes))
    layout = ", A channels_last" if args.channels_last else ""
    print(f"{machine('cpu')}; A: this checkout, B: {args.against or args.csrc}; {args.rounds} "
          f"rounds, {weights}{layout}; median ms [interquartile range]")
    print(f"{'model':10} {'N:M':5} {'rule':5} " + " ".join(f"{c:>21}" for c in CONTENDERS)
          + "  A/torch B/torch    A/B")
    rows = []
    models = args.models if args.shapes is None else ["shapes"]
    for model in models:
        for n, m in args.patterns:
            shapes = (shapes_of(model, m, args.layers) if args.shapes is None
                      else [s for group in args.shapes for s in group])
            for rule in args.rules if shapes else ():
                calls = steps(modules, shapes, n, m, rule, args.channels_last)
                times = interleaved_rounds(calls, args.rounds, args.warmup,
                                           Timer(torch.device("cpu")))
                med = {c: statistics.median(times[c]) for c in CONTENDERS}
                rows.append({"model": model, "pattern": f"{n}:{m}", "rule": rule, **med})
                print(f"{model:10} {n}:{m:<3} {rule:5} "
                      + " ".join(f"{summary(times[c]):>21}" for c in CONTENDERS)
                      + f"  {med['A'] / med['torch']:7.3f} {med['B'] / med['torch']:7.3f}"
                      f" {med['A'] / med['B']:6.3f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
