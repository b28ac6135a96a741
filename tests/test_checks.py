"""tools.checks: running commands as checks, reading pytest's junit XML (a real report of a
generated test file), judging, and the Markdown report."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tools import checks
from tools.checks import Case, Check, Outcome

CLEAN = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0"
failures="0" skipped="0" tests="2"><testcase classname="tests.test_a" name="test_x" time="0.1"/>
<testcase classname="tests.test_a" name="test_y[1]" time="0.1"/></testsuite></testsuites>"""

GENERATED = '''
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_passes():
    pass

def test_fails():
    assert 1 == 2, "one is not two"

def test_errors(broken):
    pass

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_skipped():
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfails():
    assert False
'''


def _pytest_check(junit: Path | None, name: str = "tests") -> Check:
    return Check(name, ["python", "-m", "pytest"], 60, "pytest", junit=junit)


@pytest.fixture(scope="module")
def generated_report(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A junit report pytest wrote for a file with one test of each outcome."""
    folder = tmp_path_factory.mktemp("generated")
    (folder / "test_generated.py").write_text(textwrap.dedent(GENERATED))
    junit = folder / "report.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         f"--junitxml={junit}", "test_generated.py"],
        cwd=folder, capture_output=True, text=True, timeout=120,
    )
    return junit, proc


def test_parse_a_report_pytest_wrote(generated_report):
    junit, proc = generated_report
    assert proc.returncode == 1, proc.stdout
    cases = {c.test.rsplit("::", 1)[1]: c for c in checks.parse_junit(junit.read_text())}
    assert {name: c.outcome for name, c in cases.items()} == {
        "test_passes": "passed",
        "test_fails": "failed",
        "test_errors": "error",
        "test_skipped": "skipped",
        "test_xfails": "xfailed",
    }
    assert cases["test_passes"].test == "test_generated::test_passes"
    assert "one is not two" in cases["test_fails"].message
    assert "fixture broke" in cases["test_errors"].message
    assert cases["test_skipped"].message == "needs a CUDA device"
    assert "known bug" in cases["test_xfails"].message
    counts = checks.count_cases(list(cases.values()))
    assert counts == {"passed": 1, "failed": 1, "error": 1, "skipped": 1, "xfailed": 1}


def test_judge_names_what_failed_errored_and_was_skipped(generated_report):
    junit, proc = generated_report
    result = checks.judge(_pytest_check(junit), Outcome(proc.returncode, 2.0, proc.stdout))
    assert not result.passed
    assert "pytest exit code 1" in result.reason
    assert "1 test(s) failed: test_generated::test_fails (" in result.reason
    assert "1 test(s) errored: test_generated::test_errors (" in result.reason
    assert ("1 test(s) skipped, so NOT VERIFIED on this machine: "
            "test_generated::test_skipped (needs a CUDA device)") in result.reason
    assert result.counts["skipped"] == 1


def test_a_clean_report_passes_and_names_expected_failures(tmp_path):
    junit = tmp_path / "r.xml"
    junit.write_text(CLEAN)
    result = checks.judge(_pytest_check(junit), Outcome(0, 1.0, ""))
    assert result.passed and result.reason == "2 passed" and result.counts == {"passed": 2}
    cases = [Case("a::t", "passed"), Case("a::u", "xfailed", "known bug")]
    passed, reason, counts = checks.judge_pytest(Outcome(0, 1.0, ""), cases)
    assert passed and reason == "1 passed; 1 expected failure(s): a::u (known bug)"
    assert counts == {"passed": 1, "xfailed": 1}


def test_collection_and_teardown_errors_are_errors():
    text = """<testsuites><testsuite><testcase classname="" name="tests.test_broken">
    <error message="collection failure">ImportError: no module</error></testcase>
    <testcase classname="tests.test_a" name="test_t"><error message="failed on teardown with
    &quot;OSError&quot;"/></testcase></testsuite></testsuites>"""
    cases = checks.parse_junit(text)
    assert [(c.test, c.outcome) for c in cases] == [
        ("tests.test_broken", "error"), ("tests.test_a::test_t", "error")]
    passed, reason, _ = checks.judge_pytest(Outcome(2, 1.0, ""), cases)
    assert not passed and "2 test(s) errored: tests.test_broken (collection failure)" in reason
    assert "no test passed" in reason


def test_no_report_no_tests_timeouts_and_start_failures_fail(tmp_path):
    missing = checks.judge(_pytest_check(tmp_path / "none.xml"), Outcome(4, 1.0, "ERROR"))
    assert not missing.passed
    assert missing.reason == "pytest wrote no junit report (none.xml) (exit code 4)"
    (tmp_path / "bad.xml").write_text("<testsuites><testsuite>")
    unreadable = checks.judge(_pytest_check(tmp_path / "bad.xml"), Outcome(0, 1.0, ""))
    assert not unreadable.passed and "unreadable junit report bad.xml" in unreadable.reason
    (tmp_path / "empty.xml").write_text("<testsuites><testsuite tests='0'/></testsuites>")
    empty = checks.judge(_pytest_check(tmp_path / "empty.xml"), Outcome(5, 1.0, ""))
    assert not empty.passed and empty.reason == "no test ran (exit code 5): nothing verified"
    timed = checks.judge(_pytest_check(tmp_path / "r.xml"), Outcome(None, 60.0, "..", True))
    assert not timed.passed and "timed out" in timed.reason
    bench = Check("bench", ["python", "-m", "benchmarks.step"], 10)
    timed = checks.judge(bench, Outcome(None, 10.0, "partial", timed_out=True))
    assert not timed.passed and "timed out" in timed.reason
    gone = checks.judge(bench, Outcome(None, 0.0, "", error="No such file"))
    assert not gone.passed and "could not run" in gone.reason


def test_many_failures_are_listed_up_to_a_limit():
    cases = [Case(f"t::{i}", "failed") for i in range(checks.LISTED + 3)]
    _, reason, _ = checks.judge_pytest(Outcome(1, 1.0, ""), cases)
    assert f"{checks.LISTED + 3} test(s) failed" in reason and "; and 3 more" in reason
    assert f"t::{checks.LISTED - 1}" in reason and f"t::{checks.LISTED};" not in reason


def test_command_verify_can_fail_a_zero_exit():
    def verify(output: str) -> str | None:
        return "measured nothing" if "nothing" in output else None

    check = Check("semi", ["x"], 10, verify=verify)
    assert not checks.judge(check, Outcome(0, 1.0, "nothing can be measured")).passed
    assert checks.judge(check, Outcome(0, 1.0, "table")).passed
    assert not checks.judge(check, Outcome(3, 1.0, "table")).passed


def test_report_has_summary_first_and_every_check(tmp_path):
    junit = tmp_path / "r.xml"
    junit.write_text(CLEAN.replace('time="0.1"/>\n<testcase', 'time="0.1"><skipped '
                                   'message="needs a CUDA device"/></testcase>\n<testcase'))
    results = [
        checks.judge(_pytest_check(junit, "kernel tests"), Outcome(0, 3.0, "..s")),
        checks.judge(Check("bench", ["python", "-c", "1"], 5), Outcome(0, 2.0, "ok ```x```")),
        checks.judge(Check("slow", ["sleep", "9"], 5), Outcome(None, 5.0, "", timed_out=True)),
    ]
    report = checks.render_report(results, ["GPU: fake"])
    lines = report.splitlines()
    assert lines[0] == "# GPU check report" and lines[2] == "3 checks: 1 passed, 2 failed"
    assert "## 1. kernel tests: FAILED" in report and "## 2. bench: PASSED" in report
    assert "Tests: 1 passed, 1 skipped" in report and "NOT VERIFIED" in report
    assert "(timed out after 5 s)" in report and "`sleep 9`" in report
    assert "````\nok ```x```\n````" in report  # the fence outgrows the output's backticks


def test_run_command_kills_on_timeout_and_keeps_output():
    code = "import sys, time; print('started', flush=True); time.sleep(60)"
    outcome = checks.run_command([sys.executable, "-c", code], timeout=1.0)
    assert outcome.timed_out and outcome.returncode is None and "started" in outcome.output
    failed = checks.run_command([sys.executable, "-c", "import sys; sys.exit(3)"], 30)
    assert failed.returncode == 3 and not failed.timed_out
    missing = checks.run_command(["/nonexistent/program"], 30)
    assert missing.error is not None and not checks.judge(Check("m", ["m"], 1), missing).passed


def test_run_check_never_judges_a_stale_report(tmp_path):
    junit = tmp_path / "r.xml"
    junit.write_text(CLEAN)  # left by an earlier run
    check = _pytest_check(junit)
    check.command = [sys.executable, "-c", "pass"]  # writes no report
    result = checks.judge(check, checks.run_check(check))
    assert not result.passed and "wrote no junit report" in result.reason
    failing = Check("p", ["true"], 5, prepare=lambda: 1 / 0)
    assert "prepare failed: ZeroDivisionError" in checks.run_check(failing).error
