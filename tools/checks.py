"""Commands run as checks: each in the repository root as a subprocess with a timeout and
its output captured, judged by its exit status or, for pytest, by the junit XML report it
writes (``--junitxml``), and written up as one Markdown report (:func:`render_report`).
:mod:`tools.gpu_check` builds the checks of a GPU machine over this."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: every check runs there."""
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed")
"""A test case's outcome in a junit report, in the order counts are shown."""
TAIL_LINES = 60
TAIL_CHARS = 6000
LISTED = 10
"""At most this many failing or skipped tests are named in a verdict."""

@dataclass
class Check:
    """One check: a command run in the repository root, judged as ``kind`` says.

    ``kind`` is ``"pytest"`` (judged by the junit XML that the command writes to ``junit``) or
    ``"command"`` (exit status). ``prepare`` runs just before the command (e.g. writes its
    data); ``verify`` gets the captured output after a zero exit and returns a failure reason
    or ``None``.
    """

    name: str
    command: list[str]
    timeout: float
    kind: str = "command"
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[], None] | None = None
    verify: Callable[[str], str | None] | None = None
    junit: Path | None = None


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


@dataclass(frozen=True)
class Case:
    """One test case of a junit report: its pytest id, outcome (:data:`OUTCOMES`) and the
    message of a failure, error or skip (``""`` if none)."""

    test: str
    outcome: str
    message: str = ""


@dataclass
class Result:
    """A judged check: the check, its outcome, ``passed``, the verdict's reason and the test
    counts (empty for other kinds)."""

    check: Check
    outcome: Outcome
    passed: bool
    reason: str
    counts: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- junit XML


def parse_junit(text: str) -> list[Case]:
    """The test cases of a pytest junit XML report (``--junitxml``).

    A case with an ``<error>`` element is ``error`` (also a collection error, or a teardown
    error after a pass), else with ``<failure>`` ``failed``, with ``<skipped>`` ``xfailed``
    when its type is ``pytest.xfail`` and ``skipped`` otherwise, else ``passed``. Raises
    ``xml.etree.ElementTree.ParseError`` on text that is not XML."""
    cases = []
    for element in ET.fromstring(text).iter("testcase"):
        classname, name = element.get("classname", ""), element.get("name", "")
        test = f"{classname}::{name}" if classname else name
        outcome, message = "passed", ""
        for tag in ("error", "failure", "skipped"):
            found = element.find(tag)
            if found is not None:
                message = found.get("message", "") or (found.text or "").strip()
                if tag == "skipped":
                    outcome = "xfailed" if found.get("type") == "pytest.xfail" else "skipped"
                else:
                    outcome = "error" if tag == "error" else "failed"
                break
        cases.append(Case(test, outcome, message))
    return cases


def count_cases(cases: Sequence[Case]) -> dict[str, int]:
    """``{outcome: count}`` of ``cases``, the outcomes that occur, in :data:`OUTCOMES` order."""
    counts = {key: sum(c.outcome == key for c in cases) for key in OUTCOMES}
    return {key: n for key, n in counts.items() if n}


def _listed(cases: Sequence[Case]) -> str:
    """``test (message); ...`` for the first :data:`LISTED` of ``cases``."""
    named = [f"{c.test} ({c.message})" if c.message else c.test for c in cases[:LISTED]]
    more = f"; and {len(cases) - LISTED} more" if len(cases) > LISTED else ""
    return "; ".join(named) + more


def read_junit(path: Path | None) -> tuple[list[Case] | None, str]:
    """The cases of the junit report at ``path``, or ``None`` and why there are none."""
    if path is None:
        return None, "the check names no junit report"
    try:
        return parse_junit(path.read_text(encoding="utf-8")), ""
    except FileNotFoundError:
        return None, f"pytest wrote no junit report ({path.name})"
    except (ET.ParseError, OSError) as err:
        return None, f"unreadable junit report {path.name}: {err}"


def judge_pytest(
    outcome: Outcome, cases: list[Case] | None, missing: str = ""
) -> tuple[bool, str, dict[str, int]]:
    """Judge a pytest run whose every selected test must run on this machine (the CUDA tests
    on a CUDA machine) from its junit ``cases``: ``(passed, reason, counts)``.

    It fails if it timed out or could not run, wrote no report (``missing`` says why), ran no
    test, exited non-zero, or any test failed, errored or was skipped (a skipped test verified
    nothing here). Expected failures (``xfail``) are named, not held against it."""
    if outcome.error is not None:
        return False, f"could not run: {outcome.error}", {}
    if outcome.timed_out:
        return False, "timed out (killed) before pytest wrote its report; output below", {}
    if cases is None:
        return False, f"{missing} (exit code {outcome.returncode})", {}
    counts = count_cases(cases)
    if not cases:
        return False, f"no test ran (exit code {outcome.returncode}): nothing verified", counts
    problems = []
    if outcome.returncode != 0:
        problems.append(f"pytest exit code {outcome.returncode}")
    for key, what in (("failed", "failed"), ("error", "errored")):
        bad = [c for c in cases if c.outcome == key]
        if bad:
            problems.append(f"{len(bad)} test(s) {what}: {_listed(bad)}")
    skipped = [c for c in cases if c.outcome == "skipped"]
    if skipped:
        problems.append(
            f"{len(skipped)} test(s) skipped, so NOT VERIFIED on this machine: "
            f"{_listed(skipped)}"
        )
    if not counts.get("passed"):
        problems.append("no test passed")
    if problems:
        return False, "; ".join(problems), counts
    note = f"{counts['passed']} passed"
    xfailed = [c for c in cases if c.outcome == "xfailed"]
    if xfailed:
        note += f"; {len(xfailed)} expected failure(s): {_listed(xfailed)}"
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
    """The :class:`Result` of ``check`` given its ``outcome`` (and, for a pytest check, the
    junit report it wrote)."""
    if check.kind == "pytest":
        cases, missing = read_junit(check.junit)
        passed, reason, counts = judge_pytest(outcome, cases, missing)
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
    if check.junit is not None:
        check.junit.unlink(missing_ok=True)  # never judge a report of an earlier run
    if check.prepare is not None:
        try:
            check.prepare()
        except Exception as err:  # recorded, and the next check runs
            return Outcome(None, 0.0, "", error=f"prepare failed: {err!r}")
    return run_command(check.command, check.timeout, check.env)
