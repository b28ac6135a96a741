"""The Triton kernels compiled for a GPU on a machine without one, and what their cubins say.

The host functions of :mod:`bame_optim.kernels.triton_kept` and
:mod:`bame_optim.kernels.triton_evolve` run as on CUDA (CPU tensors pass their device checks),
with every kernel replaced by a recorder that keeps each launch's arguments and runs nothing
(:func:`recorded_launches`). Each distinct launch is then compiled by Triton's own compiler with
the signature its JIT would give it (:func:`compile_launch`, down to a cubin: ``ptxas`` ships
with Triton), and the cubin is read back with the ``cuobjdump`` Triton also ships
(:func:`resources`): registers, stack (spills live there), SASS instructions and the warps an
SM can keep resident. ``tests/test_triton_compile.py`` compiles every kernel this way and
fails on spills; the command prints the figures for a step over a 3x3 convolution and a Linear
weight at 2:4 and 1:16 (the static side of a kernel change; what it buys on a GPU is for
``python -m tools.gpu_check``)::

    .venv/bin/python -m tools.triton_static                 # sm_90 (H100, H200)
    .venv/bin/python -m tools.triton_static --capability 80
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from bame_optim.kernels import triton_evolve, triton_kept

__all__ = ["KERNELS", "Launch", "compile_launch", "distinct_launches", "main",
           "recorded_launches", "resident_warps", "resources"]

KERNELS = ("kept_sgd_kernel", "kept_adamw_kernel", "evolve_kernel", "apply_kernel")
"""The Triton programs of the two kernel modules, by name."""
REGISTERS_PER_SM = 65536
"""32-bit registers of one SM (every architecture from sm_70 to sm_90)."""
MAX_WARPS_PER_SM = 64
"""Resident warps an SM can hold (sm_80, sm_90)."""


class _Recorder:
    """Stands in for a kernel: keeps each launch's arguments, runs nothing."""

    def __init__(self, kernel: Any) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


@dataclass(frozen=True)
class Launch:
    """One distinct launch: the kernel's name, Triton's ``ASTSource`` and the launch options
    (``num_warps``, ``enable_fp_fusion``, ...)."""

    name: str
    source: Any
    options: dict[str, Any]

    def constants(self) -> dict[str, Any]:
        """The compile-time constants by parameter name."""
        names = self.source.fn.arg_names
        return {names[i]: value for (i,), value in self.source.constants.items()}


@contextmanager
def recorded_launches() -> Iterator[dict[str, _Recorder]]:
    """While open, the host functions run as on CUDA and every kernel records instead of
    running; yields ``{kernel name: recorder}`` (:func:`distinct_launches` reads it)."""
    recorders = {}
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(triton_kept, "interpreting", lambda: True))
        for module in (triton_kept._kernels(), triton_evolve._kernels()):
            for name in KERNELS:
                if hasattr(module, name):
                    recorders[name] = _Recorder(getattr(module, name))
                    stack.enter_context(mock.patch.object(module, name, recorders[name]))
        yield recorders


def distinct_launches(recorders: dict[str, _Recorder]) -> list[Launch]:
    """Each distinct launch recorded, with the signature Triton's JIT would compile it for:
    the constexprs of the call, the annotated parameter types, ``mangle_type`` for the rest
    (which, as the JIT does, makes an integer argument equal to 1 a constant)."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    seen: dict[tuple[str, ...], Launch] = {}
    for name, recorder in recorders.items():
        for args, kwargs in recorder.launches:
            signature, constants = {}, {}
            for index, param in enumerate(recorder.kernel.params):
                if param.is_constexpr:
                    signature[param.name] = "constexpr"
                    constants[(index,)] = kwargs[param.name]
                    continue
                kind = param.annotation_type or mangle_type(args[index],
                                                            not param.do_not_specialize)
                signature[param.name] = kind
                if kind == "constexpr":
                    constants[(index,)] = args[index]
            options = {k: v for k, v in kwargs.items() if k not in signature}
            key = (name, repr(sorted(signature.items())), repr(sorted(constants.items())),
                   repr(sorted(options.items())))
            seen.setdefault(key, Launch(name, ASTSource(recorder.kernel, signature, constants),
                                        options))
    return list(seen.values())


def compile_launch(launch: Launch, capability: int = 90) -> Any:
    """Triton's compiled kernel of ``launch`` for an NVIDIA GPU of ``capability`` (its
    ``asm["cubin"]``, ``asm["ptx"]``); no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget

    return triton.compile(launch.source, target=GPUTarget("cuda", capability, 32),
                          options=launch.options)


def resources(cubin: bytes) -> dict[str, int]:
    """``registers``, ``stack`` (bytes a thread; spilled registers live there) and SASS
    ``instructions`` of the kernel in ``cubin``, read with Triton's ``cuobjdump``."""
    import triton

    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
    registers = re.findall(r"REG:(\d+)", usage)
    stacks = re.findall(r"STACK:(\d+)", usage)
    if not registers or not stacks:
        raise RuntimeError(f"cuobjdump -res-usage gave no figures:\n{usage}")
    instructions = sum(1 for line in sass.splitlines()
                       if re.match(r"\s+/\*[0-9a-f]{4}\*/\s+\S", line))
    return {"registers": max(map(int, registers)), "stack": max(map(int, stacks)),
            "instructions": instructions}


def resident_warps(registers: int, num_warps: int) -> int:
    """Warps an SM keeps resident for a kernel of ``registers`` a thread and ``num_warps`` a
    program, as far as registers limit it."""
    programs = REGISTERS_PER_SM // (registers * 32 * num_warps)
    return min(programs * num_warps, MAX_WARPS_PER_SM)


def _representative_launches() -> list[tuple[str, Launch]]:
    """``(what, launch)`` of a kept step (SGD and AdamW) over a 3x3 convolution and a Linear
    weight together (one launch of two rows, as a model's step is), and of an evolve update of
    each, at 2:4 and 1:16, float32."""
    from bame_optim.core.kept import encode_kept
    from bame_optim.core.nm import random_nm_mask

    shapes = {"conv 64x64x3x3": (64, 64, 3, 3), "Linear 256x256": (256, 256)}
    labelled = []
    for n, m in ((2, 4), (1, 16)):
        weights = {name: (torch.randn(shape), torch.randn(shape)) for name, shape in shapes.items()}
        blocks = {name: w.numel() // m for name, (w, _) in weights.items()}
        codes = {name: encode_kept(random_nm_mask(k, n, m, torch.Generator().manual_seed(0)), n)
                 for name, k in blocks.items()}
        params, grads = [w for w, _ in weights.values()], [g for _, g in weights.values()]
        state = [[torch.zeros(k, n) for k in blocks.values()] for _ in range(2)]
        with recorded_launches() as recorders:
            triton_kept.kept_sgd_(params, grads, state[0], list(codes.values()), [n, n],
                                  [False, False], m=m, lr=0.1, momentum=0.9, dampening=0.0,
                                  weight_decay=5e-4, nesterov=False, maximize=False)
            triton_kept.kept_adamw_(params, grads, *state, [], [torch.tensor(0.0)] * 2,
                                    list(codes.values()), [n, n], m=m, amsgrad=False,
                                    beta1=0.9, beta2=0.999, lr=1e-3, weight_decay=0.05,
                                    eps=1e-8, maximize=False)
            labelled += [(" + ".join(shapes), launch)
                         for launch in distinct_launches(recorders)]
        for name, (weight, grad) in weights.items():
            with recorded_launches() as recorders:
                triton_evolve.evolve_blocks(weight, grad, codes[name], n,
                                            torch.zeros(blocks[name]), n=n, m=m, lr=0.1,
                                            gamma=0.9, revive="sgd", zero_pruned=True)
                triton_evolve.apply_evolved_(weight, [torch.zeros(blocks[name], n)],
                                             codes[name], n, codes[name].clone(),
                                             torch.zeros(blocks[name], dtype=torch.bool), m)
                labelled += [(name, launch) for launch in distinct_launches(recorders)]
    return labelled


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capability", type=int, default=90,
                        help="NVIDIA compute capability to compile for (90: H100/H200)")
    args = parser.parse_args(argv)
    if args.capability < 70:
        parser.error(f"Invalid --capability value: {args.capability} (70 or more)")
    rows = []
    with tempfile.TemporaryDirectory() as cache, \
            mock.patch.dict(os.environ, {"TRITON_CACHE_DIR": cache}):
        for what, launch in _representative_launches():
            compiled = compile_launch(launch, args.capability)
            figures = resources(compiled.asm["cubin"])
            warps = launch.options.get("num_warps", compiled.metadata.num_warps)
            constants = launch.constants()
            rows.append({"kernel": launch.name, "weights": what, "M": constants["M"],
                         "count": constants["COUNT"], "blocks": constants["BLOCK_K"], **figures,
                         "warps": resident_warps(figures["registers"], warps)})
    print(f"sm_{args.capability}: per distinct launch (float32), from the cubin")
    print("| kernel | weights | M | count | blocks a program | registers | stack B |"
          " SASS instructions | resident warps / SM |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['weights']} | {r['M']} | {r['count']} | {r['blocks']} |"
              f" {r['registers']} | {r['stack']} | {r['instructions']} | {r['warps']} |")
    return rows


if __name__ == "__main__":
    main()
