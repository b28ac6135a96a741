"""Every CUDA check of the project in one call, written to one Markdown report.

On a machine with CUDA it runs, each as a subprocess with a timeout and its output captured:

1. the 2:4 kernel and transposable-mask tests (``tests/test_semi_structured.py``,
   ``tests/test_transposable.py``),
2. the CUDA step test of ``tests/test_sgd.py`` (``-k cuda``: ordinary steps under
   ``torch.cuda.set_sync_debug_mode("error")``, compared with the CPU),
3. the Triton kept-kernel tests (``tests/test_triton_kept.py``, ``tests/test_kernel_ops.py`` with
   ``TRITON_INTERPRET=0``: the kernel tests on CUDA tensors, the ops, compiled and optimizer
   steps on CUDA),
4. any other test file that skips tests for want of CUDA (found by reading ``tests/``),
5. the optimizer-step benchmark ``python -m benchmarks.step --device cuda``,
6. the fused-kernel step benchmark ``python -m benchmarks.kept_step_cuda``: BAMESGD / BAMEAdamW
   ordinary, evolve-update and ``torch.compile``-d steps against ``torch.optim.SGD/AdamW(
   fused=True)``, with the ratios,
7. the 2:4 kernel benchmark ``python -m benchmarks.semi_structured``,
8. a two-epoch ``examples/train_cifar.py`` run on a tiny CIFAR-10 folder written to a
   temporary directory (Accelerate picks the GPU; the run's ``metrics.json`` must say cuda).

A pytest check passes only if pytest exits 0, some test passed and no test was skipped for want
of CUDA: on a CUDA machine such a skip means the check verified nothing. A check that fails,
times out or cannot start is recorded and the next one runs. The report (``--out``) gives a
summary line first, then per check the command, exit code, wall time, test counts, verdict and
the tail of the output. Exit status 1 if any check failed.

Without CUDA it writes a report saying every check was skipped, prints one line and exits 0::

    python -m benchmarks.gpu_check                       # all checks, full benchmark sizes
    python -m benchmarks.gpu_check --quick --out report.md
    python -m benchmarks.gpu_check --only step-benchmark train-cifar
"""

from __future__ import annotations

import argparse
import datetime
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: every check runs there."""
TESTS = ROOT / "tests"
GPU_TEST_FILES = ("tests/test_semi_structured.py", "tests/test_transposable.py")
"""The 2:4 kernel tests (CUDA half skips without an sm80+ GPU) and the transposable masks."""
CUDA_STEP_TEST = "tests/test_sgd.py"
"""The file of the sync-debug-mode CUDA step test (selected with ``-k cuda``)."""
TRITON_TESTS = ("tests/test_triton_kept.py", "tests/test_kernel_ops.py")
"""The Triton kept-kernel tests (on CUDA tensors when ``TRITON_INTERPRET`` is not set) and the
ops' tests."""
CUDA_REASON = re.compile(r"cuda|gpu|sm ?\d\d|cusparselt", re.IGNORECASE)
"""A skip reason that says the test needed CUDA."""
SKIP_MARKER = re.compile(r"skipif\(|pytest\.skip\(|importorskip\(|mark\.skip\(")
SUMMARY_COUNT = re.compile(
    r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?|rerun)\b"
)
SUMMARY_LINE = re.compile(r"\bin \d+(?:\.\d+)?s\b")
SKIP_LINE = re.compile(r"^SKIPPED \[(\d+)\] (\S+?): (.*)$")
TAIL_LINES = 60
TAIL_CHARS = 6000


@dataclass
class Check:
    """One check: a command run in the repository root, judged as ``kind`` says.

    ``kind`` is ``"pytest"`` (judged by pytest's summary and skip reasons) or ``"command"``
    (exit status). ``prepare`` runs just before the command (e.g. writes its data);
    ``verify`` gets the captured output after a zero exit and returns a failure reason or
    ``None``.
    """

    name: str
    command: list[str]
    timeout: float
    kind: str = "command"
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[], None] | None = None
    verify: Callable[[str], str | None] | None = None


@dataclass
class Outcome:
    """What running a command gave: exit code (``None`` if it did not finish), wall seconds,
    the output (stdout and stderr together) and whether it ran past its timeout."""

    returncode: int | None
    seconds: float
    output: str
    timed_out: bool = False
    error: str | None = None
    """Why the command could not run (or ``prepare`` failed), if so."""


@dataclass
class Result:
    """A judged check: the check, its outcome, ``passed``, the verdict's reason and the pytest
    counts (empty for other kinds)."""

    check: Check
    outcome: Outcome
    passed: bool
    reason: str
    counts: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- pure parsing


def parse_pytest_counts(output: str) -> dict[str, int] | None:
    """The counts of pytest's final summary line (``"3 passed, 2 skipped in 1.2s"`` ->
    ``{"passed": 3, "skipped": 2}``; plural ``errors``/``warnings`` folded into the singular);
    ``{}`` for ``no tests ran``; ``None`` if there is no summary line."""
    for line in reversed(output.splitlines()):
        if not SUMMARY_LINE.search(line):
            continue
        found = SUMMARY_COUNT.findall(line)
        if found:
            counts: dict[str, int] = {}
            for number, word in found:
                key = word.rstrip("s") if word in ("errors", "warnings") else word
                counts[key] = counts.get(key, 0) + int(number)
            return counts
        if "no tests ran" in line:
            return {}
    return None


def parse_skips(output: str) -> list[tuple[int, str, str]]:
    """The ``-rs`` skip lines of a pytest run: ``(count, location, reason)`` each."""
    skips = []
    for line in output.splitlines():
        match = SKIP_LINE.match(line.strip())
        if match:
            skips.append((int(match.group(1)), match.group(2), match.group(3)))
    return skips


def judge_pytest(outcome: Outcome) -> tuple[bool, str, dict[str, int]]:
    """Judge a pytest run on a CUDA machine: ``(passed, reason, counts)``.

    It fails if it timed out or could not run, has no summary, exits non-zero, skipped any test
    for want of CUDA (nothing was verified on the GPU), skipped tests whose reasons are not shown
    (run pytest with ``-rs``), or passed no test. Other skips are named in the reason."""
    if outcome.error is not None:
        return False, f"could not run: {outcome.error}", {}
    counts = parse_pytest_counts(outcome.output)
    if outcome.timed_out:
        return False, "timed out (killed); partial output below", counts or {}
    if counts is None:
        return False, f"no pytest summary in the output (exit code {outcome.returncode})", {}
    ran = ("passed", "failed", "skipped", "error", "xfailed", "xpassed")
    if outcome.returncode == 5 or not any(counts.get(key) for key in ran):
        return False, "no test ran: nothing verified", counts
    skips = parse_skips(outcome.output)
    cuda_skips = [s for s in skips if CUDA_REASON.search(s[2])]
    other_skips = [s for s in skips if not CUDA_REASON.search(s[2])]
    n_cuda = sum(s[0] for s in cuda_skips)
    n_other = sum(s[0] for s in other_skips)
    unexplained = counts.get("skipped", 0) - n_cuda - n_other
    problems = []
    if outcome.returncode != 0:
        problems.append(f"pytest exit code {outcome.returncode}")
    if n_cuda:
        reasons = "; ".join(sorted({s[2] for s in cuda_skips}))
        problems.append(
            f"{n_cuda} test(s) skipped for want of CUDA on a CUDA machine, so NOT VERIFIED "
            f"({reasons})"
        )
    if unexplained > 0:
        problems.append(f"{unexplained} skipped test(s) without a reason shown (need -rs)")
    if not counts.get("passed"):
        problems.append("no test passed")
    if problems:
        return False, "; ".join(problems), counts
    note = f"{counts['passed']} passed"
    if n_other:
        note += f"; {n_other} skipped for other reasons: " + "; ".join(
            sorted({s[2] for s in other_skips})
        )
    return True, note, counts


def judge_command(
    outcome: Outcome, verify: Callable[[str], str | None] | None = None
) -> tuple[bool, str]:
    """Judge a non-pytest command: ``(passed, reason)``; it passes on exit code 0 when
    ``verify`` (given the output) finds nothing wrong."""
    if outcome.error is not None:
        return False, f"could not run: {outcome.error}"
    if outcome.timed_out:
        return False, "timed out (killed); partial output below"
    if outcome.returncode != 0:
        return False, f"exit code {outcome.returncode}"
    if verify is not None:
        problem = verify(outcome.output)
        if problem:
            return False, problem
    return True, "exit code 0"


def judge(check: Check, outcome: Outcome) -> Result:
    """The :class:`Result` of ``check`` given its ``outcome``."""
    if check.kind == "pytest":
        passed, reason, counts = judge_pytest(outcome)
        if passed and check.verify is not None:
            problem = check.verify(outcome.output)
            if problem:
                passed, reason = False, problem
        return Result(check, outcome, passed, reason, counts)
    passed, reason = judge_command(outcome, check.verify)
    return Result(check, outcome, passed, reason)


# ----------------------------------------------------------------------------- the report


def summary_line(results: Sequence[Result]) -> str:
    """``"N checks: X passed, Y failed"``."""
    passed = sum(r.passed for r in results)
    return f"{len(results)} checks: {passed} passed, {len(results) - passed} failed"


def tail(text: str, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    """The last ``lines`` lines of ``text``, at most ``chars`` characters."""
    kept = "\n".join(text.rstrip().splitlines()[-lines:])
    return kept[-chars:]


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def format_counts(counts: dict[str, int]) -> str:
    """``"35 passed, 10 skipped"`` (``"-"`` if empty)."""
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "-"


def render_report(results: Sequence[Result], facts: Sequence[str] = ()) -> str:
    """The Markdown report: title, summary line, ``facts`` (bullets), a table, then per check
    its command, exit code, wall time, counts, verdict and output tail."""
    out = ["# GPU check report", "", summary_line(results), ""]
    out += [f"- {fact}" for fact in facts]
    out += [
        "",
        "| # | check | verdict | exit code | wall time | tests |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, 1):
        verdict = "PASSED" if r.passed else "FAILED"
        code = "timeout" if r.outcome.timed_out else r.outcome.returncode
        out.append(
            f"| {i} | {r.check.name} | {verdict} | {code} | {r.outcome.seconds:.1f} s "
            f"| {format_counts(r.counts) if r.check.kind == 'pytest' else '-'} |"
        )
    for i, r in enumerate(results, 1):
        text = tail(r.outcome.output) or "(no output)"
        fence = _fence(text)
        out += [
            "",
            f"## {i}. {r.check.name}: {'PASSED' if r.passed else 'FAILED'}",
            "",
            f"- Command: `{shlex.join(r.check.command)}`",
            f"- Exit code: {r.outcome.returncode}"
            + (f" (timed out after {r.check.timeout:g} s)" if r.outcome.timed_out else ""),
            f"- Wall time: {r.outcome.seconds:.1f} s",
        ]
        if r.check.kind == "pytest":
            out.append(f"- Tests: {format_counts(r.counts)}")
        out += [f"- Verdict: {r.reason}", "", "Output tail:", "", fence, text, fence]
    return "\n".join(out) + "\n"


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


# ----------------------------------------------------------------------------- running


def run_command(
    command: Sequence[str], timeout: float, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> Outcome:
    """Run ``command`` in ``cwd`` with stdout and stderr captured together; past ``timeout``
    seconds kill its whole process group and keep the output so far."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as err:
        return Outcome(None, time.perf_counter() - start, "", error=str(err))
    try:
        raw, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        try:
            raw, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a grandchild keeps the pipe open
            raw = b""
    seconds = time.perf_counter() - start
    text = (raw or b"").decode("utf-8", errors="replace")
    return Outcome(None if timed_out else proc.returncode, seconds, text, timed_out)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that ``proc`` leads (it was started in a new session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_check(check: Check) -> Outcome:
    """Prepare and run ``check``; a failing ``prepare`` is an :class:`Outcome` with an error."""
    if check.prepare is not None:
        try:
            check.prepare()
        except Exception as err:  # recorded, and the next check runs
            return Outcome(None, 0.0, "", error=f"prepare failed: {err!r}")
    return run_command(check.command, check.timeout, check.env)


# ----------------------------------------------------------------------------- the checks


def cuda_test_files(tests_dir: Path = TESTS) -> list[str]:
    """Test files (relative to the repository root) with a skip marker whose line mentions
    CUDA (``skipif(``, ``pytest.skip(``, ... on the same line as "cuda")."""
    found = []
    for path in sorted(tests_dir.glob("test_*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(SKIP_MARKER.search(ln) and "cuda" in ln.lower() for ln in text.splitlines()):
            found.append(path.relative_to(tests_dir.parent).as_posix())
    return found


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


def build_checks(quick: bool, workdir: Path) -> list[Check]:
    """The checks, in run order; ``workdir`` holds the training run's data and output (written
    by the check's ``prepare``, not here)."""
    py = sys.executable
    pytest = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    scale = 0.5 if quick else 1.0
    covered = {*GPU_TEST_FILES, CUDA_STEP_TEST, *TRITON_TESTS, "tests/test_gpu_check.py"}
    extra = [f for f in cuda_test_files() if f not in covered]
    checks = [
        Check("2:4 kernel + transposable tests", [*pytest, *GPU_TEST_FILES], 900 * scale, "pytest"),
        Check(
            "CUDA step test (sync debug mode)",
            [*pytest, CUDA_STEP_TEST, "-k", "cuda"],
            300,
            "pytest",
        ),
        Check(
            "Triton kept-kernel tests",
            [*pytest, *TRITON_TESTS],
            600,
            "pytest",
            env={"TRITON_INTERPRET": "0"},
        ),
    ]
    if extra:
        checks.append(Check("other CUDA-skipping tests", [*pytest, *extra], 900 * scale, "pytest"))
    step = [py, "-m", "benchmarks.step", "--device", "cuda"] + (["--quick"] if quick else [])
    checks.append(Check("step-benchmark", step, 1800 * scale))
    kept = [py, "-m", "benchmarks.kept_step_cuda", "--device", "cuda"]
    checks.append(
        Check("fused-kernel step benchmark", kept + (["--quick"] if quick else []), 1800 * scale)
    )
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
