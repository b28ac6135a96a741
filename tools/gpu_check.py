"""Every CUDA check of the project in one call, written to one Markdown report.

On a machine with CUDA it runs, each as a subprocess with a timeout and its output captured:

1. every test marked ``cuda`` (``pytest -m cuda tests``, with ``TRITON_INTERPRET=0``, so the
   Triton kept-kernel tests run on CUDA tensors): the 2:4 kernels, the sync-debug-mode CUDA
   step of ``BAMESGD``, the Triton kernels, their ops, compiled and optimizer steps on CUDA.
   pytest writes a junit XML report (``--junitxml``), which is what is judged;
2. the optimizer-step benchmark ``python -m benchmarks.step --device cuda``, and its AdamW
   mode (``--optimizer adamw``),
3. the fused-kernel step benchmark ``python -m benchmarks.kept_step_cuda``: BAMESGD / BAMEAdamW
   ordinary, evolve-update and ``torch.compile``-d steps against ``torch.optim.SGD/AdamW(
   fused=True)``, with the ratios and each step's host time (near its time: launch-bound),
   then ``python -m tools.triton_static``: the registers, stack and instructions of the same
   kernels' ``sm_90`` cubins, to read beside those timings,
4. the 2:4 kernel benchmark ``python -m benchmarks.semi_structured``,
5. a two-epoch ``examples/train_cifar.py`` run on a tiny CIFAR-10 folder written to a
   temporary directory (Accelerate picks the GPU; the run's ``metrics.json`` must say cuda).

The tests check passes only if pytest exits 0, its junit XML lists some passed test and no
test failed, errored or was skipped: every selected test needs CUDA, so on a CUDA machine a
skip means that test verified nothing. A check that fails, times out or cannot start is
recorded and the next one runs. The report (``--out``) gives a summary line first, then per
check the command, exit code, wall time, test counts, verdict and the tail of the output. Exit
status 1 if any check failed.

Without CUDA it writes a report saying every check was skipped for want of a CUDA device (with
the commands it would have run), prints one line and exits 0. Run from the repository root::

    python -m tools.gpu_check                       # all checks, full benchmark sizes
    python -m tools.gpu_check --quick --out report.md
    python -m tools.gpu_check --only tests step-benchmark
"""

from __future__ import annotations

import argparse
import datetime
import pickle
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .checks import ROOT, Check, Result, judge, render_report, run_check, summary_line

__all__ = ["CUDA_MARKER", "build_checks", "main", "pytest_command", "render_no_cuda_report"]

CUDA_MARKER = "cuda"
"""The pytest marker of the tests that need a CUDA device (registered in ``pyproject.toml``)."""


def render_no_cuda_report(checks: Sequence[Check], facts: Sequence[str] = ()) -> str:
    """The report of a machine without CUDA: every check skipped, with the commands it would
    have run."""
    out = [
        "# GPU check report",
        "",
        f"{len(checks)} checks: 0 passed, 0 failed, {len(checks)} skipped (no CUDA device)",
        "",
        "Every check was skipped because there is no CUDA device "
        "(`torch.cuda.is_available()` is False). Run this on a machine with a CUDA GPU.",
        "",
    ]
    out += [f"- {fact}" for fact in facts]
    out += ["", "Checks that would run:", ""]
    out += [f"- {c.name}: `{shlex.join(c.command)}`" for c in checks]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- the checks


def write_cifar_folder(folder: Path, per_batch: int = 64, seed: int = 0) -> None:
    """A tiny CIFAR-10 python-pickle folder: ``data_batch_1..5`` and ``test_batch``, each a
    dict with ``b"data"`` (uint8 ``[per_batch, 3072]``) and ``b"labels"``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def _metrics_on_cuda(run_dir: Path) -> Callable[[str], str | None]:
    """A ``verify`` that the training run wrote ``metrics.json`` with a CUDA device."""

    def verify(_output: str) -> str | None:
        import json

        path = run_dir / "metrics.json"
        if not path.is_file():
            return f"exit code 0 but no {path.name} was written"
        metrics = json.loads(path.read_text())
        device = str(metrics.get("device"))
        if not device.startswith("cuda"):
            return f"trained on {device!r}, not on CUDA: nothing verified"
        return None

    return verify


def _measured(output: str) -> str | None:
    """A ``verify`` for the 2:4 benchmark: it exits 0 without measuring on an old GPU."""
    if "nothing can be measured" in output:
        return "the benchmark measured nothing (no CUDA, or compute capability < 8.0)"
    return None


def pytest_command(junit: Path, paths: Sequence[str] = ("tests",)) -> list[str]:
    """The pytest command of the CUDA tests: every test under ``paths`` marked
    :data:`CUDA_MARKER`, in one process, its junit report written to ``junit``. A test module
    that cannot be imported there (a package the GPU machine lacks) is an error in the report,
    not the end of the run: the CUDA tests of the other modules still run."""
    return [sys.executable, "-m", "pytest", "-m", CUDA_MARKER, "-q", "-rs", "-p",
            "no:cacheprovider", "--continue-on-collection-errors", f"--junitxml={junit}",
            *paths]


def build_checks(quick: bool, workdir: Path) -> list[Check]:
    """The checks, in run order; ``workdir`` holds the junit report, the training run's data
    and its output (written when the checks run, not here)."""
    py = sys.executable
    scale = 0.5 if quick else 1.0
    junit = workdir / "cuda-tests.xml"
    checks = [
        Check("CUDA tests (pytest -m cuda)", pytest_command(junit), 1800 * scale, "pytest",
              env={"TRITON_INTERPRET": "0"}, junit=junit),
    ]
    quick_flag = ["--quick"] if quick else []
    step = [py, "-m", "benchmarks.step", "--device", "cuda", *quick_flag]
    checks.append(Check("step-benchmark", step, 1800 * scale))
    checks.append(Check("step-benchmark adamw", [*step, "--optimizer", "adamw"], 1200 * scale))
    kept = [py, "-m", "benchmarks.kept_step_cuda", "--device", "cuda", *quick_flag]
    checks.append(Check("fused-kernel step benchmark", kept, 1800 * scale))
    static = [py, "-m", "tools.triton_static"]
    checks.append(Check("Triton kernels' static figures (sm_90)", static, 600 * scale))
    semi = [py, "-m", "benchmarks.semi_structured"]
    if quick:
        semi += ["--batch", "32", "--warmup", "3", "--repeats", "10"]
        semi += ["--step-batch", "32", "--step-repeats", "3"]
    checks.append(Check("2:4 kernel benchmark", semi, 1200 * scale, verify=_measured))
    data, run_dir = workdir / "cifar10", workdir / "train_cifar"
    train = [py, "examples/train_cifar.py", "--data", str(data), "--output-dir", str(run_dir)]
    train += ["--cache-dir", str(workdir / "cache"), "--epochs", "2", "--batch-size", "32"]
    train += ["--max-train-samples", "256", "--max-eval-samples", "64", "--no-progress"]
    checks.append(
        Check(
            "train-cifar",
            train,
            900 * scale,
            env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"},
            prepare=lambda: write_cifar_folder(data),
            verify=_metrics_on_cuda(run_dir),
        )
    )
    return checks


def machine_facts(cuda: bool) -> list[str]:
    """Lines about the run: time, Python, torch, the GPU and the git commit (best effort)."""
    import torch

    facts = [
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}",
    ]
    if cuda:
        major, minor = torch.cuda.get_device_capability()
        facts.append(
            f"GPU: {torch.cuda.get_device_name()} (sm{major}{minor}), "
            f"{torch.cuda.device_count()} device(s)"
        )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if commit:
            facts.append(f"Commit: {commit} (working tree as checked out)")
    except (OSError, subprocess.SubprocessError):
        pass
    return facts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line: ``--out``, ``--quick`` and ``--only``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("gpu_check_report.md"), help="report (%(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="smaller benchmarks and timeouts")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="run only the checks whose name contains NAME"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks (or skip them all without CUDA), write the report; the exit status."""
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        checks = build_checks(args.quick, Path(tmp))
        if args.only:
            checks = [c for c in checks if any(s.lower() in c.name.lower() for s in args.only)]
            if not checks:
                print(f"gpu_check: no check name contains any of {args.only}", file=sys.stderr)
                return 2
        facts = [*machine_facts(cuda), f"Mode: {'quick' if args.quick else 'full'}"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if not cuda:
            args.out.write_text(render_no_cuda_report(checks, facts))
            print(f"gpu_check: no CUDA device, all {len(checks)} checks skipped ({args.out})")
            return 0
        results: list[Result] = []
        for i, check in enumerate(checks, 1):
            print(f"[{i}/{len(checks)}] {check.name}: {shlex.join(check.command)}", flush=True)
            result = judge(check, run_check(check))
            results.append(result)
            verdict = "PASSED" if result.passed else "FAILED"
            print(f"    {verdict} in {result.outcome.seconds:.1f} s: {result.reason}", flush=True)
            args.out.write_text(render_report(results, facts))  # kept if a later check hangs
    args.out.write_text(render_report(results, facts))
    print(f"gpu_check: {summary_line(results)} ({args.out})")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
