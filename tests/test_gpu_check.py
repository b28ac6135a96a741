"""benchmarks.gpu_check: the no-CUDA report, and the judging and report logic on fake outcomes."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import Check, Outcome

ROOT = Path(__file__).resolve().parents[1]

SKIPPED_FOR_CUDA = """\
......ssss..                                                             [100%]
=========================== short test summary info ============================
SKIPPED [2] tests/test_semi_structured.py:382: 2:4 kernels need a CUDA GPU with sm80+
SKIPPED [2] tests/test_sgd.py:397: needs a CUDA device
8 passed, 4 skipped in 2.91s
"""

ALL_PASSED = "............\n12 passed, 3 warnings in 1.50s\n"


def _pytest_check(name: str = "tests") -> Check:
    return Check(name, ["python", "-m", "pytest", "-q", "-rs"], 60, "pytest")


def test_without_cuda_exits_0_and_reports_every_check_skipped(tmp_path):
    """A real run with CUDA hidden: one printed line, a report, exit 0, nothing run."""
    out = tmp_path / "report.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and "no CUDA device" in proc.stdout
    report = out.read_text()
    assert report.startswith("# GPU check report\n")
    assert "0 passed, 0 failed" in report and "skipped (no CUDA device)" in report
    assert "Every check was skipped because there is no CUDA device" in report
    assert "benchmarks.step --device cuda --quick" in report
    assert "benchmarks.kept_step_cuda --device cuda --quick" in report
    assert "tests/test_triton_kept.py" in report
    assert "examples/train_cifar.py" in report


def test_main_without_cuda_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "run_check", lambda check: 1 / 0)  # must not be called
    assert gpu_check.main(["--out", str(tmp_path / "r.md")]) == 0
    assert "skipped (no CUDA device)" in (tmp_path / "r.md").read_text()


def test_parse_pytest_counts():
    assert gpu_check.parse_pytest_counts(SKIPPED_FOR_CUDA) == {"passed": 8, "skipped": 4}
    assert gpu_check.parse_pytest_counts(ALL_PASSED) == {"passed": 12, "warning": 3}
    assert gpu_check.parse_pytest_counts("== 1 failed, 2 errors in 0.3s ==") == {
        "failed": 1,
        "error": 2,
    }
    assert gpu_check.parse_pytest_counts("2 skipped, 30 deselected in 0.98s") == {
        "skipped": 2,
        "deselected": 30,
    }
    assert gpu_check.parse_pytest_counts("no tests ran in 0.01s") == {}
    assert gpu_check.parse_pytest_counts("Traceback ...\nImportError: x") is None


def test_skips_for_cuda_on_a_cuda_machine_mean_not_verified():
    result = gpu_check.judge(_pytest_check(), Outcome(0, 3.0, SKIPPED_FOR_CUDA))
    assert not result.passed
    assert "4 test(s) skipped for want of CUDA" in result.reason and "NOT VERIFIED" in result.reason
    assert result.counts == {"passed": 8, "skipped": 4}


def test_only_cuda_tests_selected_and_all_skipped_fails():
    output = (
        "ss\nSKIPPED [2] tests/test_sgd.py:397: needs a CUDA device\n"
        "2 skipped, 30 deselected in 0.98s\n"
    )
    result = gpu_check.judge(_pytest_check(), Outcome(0, 1.0, output))
    assert not result.passed and "no test passed" in result.reason


def test_other_skips_are_named_but_pass_and_clean_run_passes():
    output = (
        "..s\nSKIPPED [1] tests/test_x.py:9: shared Fashion-MNIST not present\n"
        "2 passed, 1 skipped in 1s\n"
    )
    result = gpu_check.judge(_pytest_check(), Outcome(0, 1.0, output))
    assert result.passed and "Fashion-MNIST not present" in result.reason
    assert gpu_check.judge(_pytest_check(), Outcome(0, 1.0, ALL_PASSED)).passed


def test_unexplained_skips_failures_and_no_tests_fail():
    no_reason = gpu_check.judge(_pytest_check(), Outcome(0, 1.0, "2 passed, 1 skipped in 1s\n"))
    assert not no_reason.passed and "without a reason" in no_reason.reason
    failed = gpu_check.judge(_pytest_check(), Outcome(1, 1.0, "1 failed, 3 passed in 2s\n"))
    assert not failed.passed and "exit code 1" in failed.reason
    empty = gpu_check.judge(_pytest_check(), Outcome(5, 1.0, "no tests ran in 0.01s\n"))
    assert not empty.passed and "no test ran" in empty.reason
    crashed = gpu_check.judge(_pytest_check(), Outcome(4, 1.0, "ERROR: file not found\n"))
    assert not crashed.passed and "no pytest summary" in crashed.reason


def test_timeout_and_start_failure_are_recorded_as_failed():
    timed = gpu_check.judge(_pytest_check(), Outcome(None, 60.0, "....", timed_out=True))
    assert not timed.passed and "timed out" in timed.reason
    bench = Check("bench", ["python", "-m", "benchmarks.step"], 10)
    timed = gpu_check.judge(bench, Outcome(None, 10.0, "partial", timed_out=True))
    assert not timed.passed and "timed out" in timed.reason
    missing = gpu_check.judge(bench, Outcome(None, 0.0, "", error="No such file"))
    assert not missing.passed and "could not run" in missing.reason


def test_command_verify_can_fail_a_zero_exit():
    semi = Check("semi", ["x"], 10, verify=gpu_check._measured)
    line = "semi_structured benchmark: compute capability (7, 5) < (8, 0), nothing can be measured"
    assert not gpu_check.judge(semi, Outcome(0, 1.0, line)).passed
    assert gpu_check.judge(semi, Outcome(0, 1.0, "table")).passed
    assert not gpu_check.judge(semi, Outcome(3, 1.0, "table")).passed


def test_training_verify_reads_the_device_from_metrics(tmp_path):
    verify = gpu_check._metrics_on_cuda(tmp_path)
    assert "no metrics.json" in verify("")
    (tmp_path / "metrics.json").write_text('{"device": "cpu"}')
    assert "not on CUDA" in verify("")
    (tmp_path / "metrics.json").write_text('{"device": "cuda:0"}')
    assert verify("") is None


def test_report_has_summary_first_and_every_check(tmp_path):
    results = [
        gpu_check.judge(_pytest_check("kernel tests"), Outcome(0, 3.0, SKIPPED_FOR_CUDA)),
        gpu_check.judge(Check("bench", ["python", "-c", "1"], 5), Outcome(0, 2.0, "ok ```x```")),
        gpu_check.judge(Check("slow", ["sleep", "9"], 5), Outcome(None, 5.0, "", timed_out=True)),
    ]
    report = gpu_check.render_report(results, ["GPU: fake"])
    lines = report.splitlines()
    assert lines[0] == "# GPU check report" and lines[2] == "3 checks: 1 passed, 2 failed"
    assert "## 1. kernel tests: FAILED" in report and "## 2. bench: PASSED" in report
    assert "Tests: 8 passed, 4 skipped" in report and "NOT VERIFIED" in report
    assert "(timed out after 5 s)" in report and "`sleep 9`" in report
    assert "````\nok ```x```\n````" in report  # the fence outgrows the output's backticks


def test_main_with_fake_cuda_records_failures_and_exits_1(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "machine_facts", lambda cuda: ["GPU: fake"])
    outcomes = iter([Outcome(0, 1.0, ALL_PASSED), Outcome(None, 9.0, "", timed_out=True)])
    checks = [_pytest_check("a"), Check("b", ["b"], 9)]
    monkeypatch.setattr(gpu_check, "build_checks", lambda quick, workdir: checks)
    monkeypatch.setattr(gpu_check, "run_check", lambda check: next(outcomes))
    out = tmp_path / "r.md"
    assert gpu_check.main(["--out", str(out)]) == 1
    assert "2 checks: 1 passed, 1 failed" in out.read_text()


def test_run_command_kills_on_timeout_and_keeps_output():
    code = "import sys, time; print('started', flush=True); time.sleep(60)"
    outcome = gpu_check.run_command([sys.executable, "-c", code], timeout=1.0)
    assert outcome.timed_out and outcome.returncode is None and "started" in outcome.output
    failed = gpu_check.run_command([sys.executable, "-c", "import sys; sys.exit(3)"], 30)
    assert failed.returncode == 3 and not failed.timed_out
    missing = gpu_check.run_command(["/nonexistent/program"], 30)
    assert missing.error is not None and not gpu_check.judge(Check("m", ["m"], 1), missing).passed


def test_checks_cover_the_cuda_tests_and_write_cifar(tmp_path):
    found = gpu_check.cuda_test_files()
    assert "tests/test_sgd.py" in found and "tests/test_semi_structured.py" in found
    checks = gpu_check.build_checks(quick=True, workdir=tmp_path)
    commands = [" ".join(c.command) for c in checks]
    assert any("tests/test_sgd.py -k cuda" in c for c in commands)
    assert any("benchmarks.step --device cuda --quick" in c for c in commands)
    assert any("-m benchmarks.semi_structured" in c for c in commands)
    train = next(c for c in checks if "train_cifar.py" in " ".join(c.command))
    assert not (tmp_path / "cifar10").exists()  # written only when the check runs
    train.prepare()
    names = sorted(p.name for p in (tmp_path / "cifar10").iterdir())
    assert names == [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    with open(tmp_path / "cifar10" / "test_batch", "rb") as f:
        batch = pickle.load(f)
    assert batch[b"data"].shape == (64, 3072) and len(batch[b"labels"]) == 64


def test_triton_tests_run_uninterpreted_once_and_the_kernel_benchmark_is_a_check(tmp_path):
    checks = {c.name: c for c in gpu_check.build_checks(quick=True, workdir=tmp_path)}
    triton = checks["Triton kept-kernel tests"]
    assert triton.kind == "pytest"
    assert triton.command[-2:] == ["tests/test_triton_kept.py", "tests/test_kernel_ops.py"]
    assert triton.env == {"TRITON_INTERPRET": "0"}  # CUDA tensors, not the CPU interpreter
    others = checks.get("other CUDA-skipping tests")
    assert others is None or not {*gpu_check.TRITON_TESTS} & {*others.command}
    bench = checks["fused-kernel step benchmark"].command
    assert bench[-4:] == ["benchmarks.kept_step_cuda", "--device", "cuda", "--quick"]
