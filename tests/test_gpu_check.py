"""tools.gpu_check: the checks it builds, the no-CUDA report, its CUDA-test selection run on
this CPU (every selected test skipped, reported as not verified), and the ``cuda`` marker guard
of ``tests/conftest.py``."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from tools import gpu_check
from tools.checks import Check, Outcome, judge, run_check

ROOT = gpu_check.ROOT
CLEAN = """<testsuites><testsuite><testcase classname="tests.test_a" name="test_x"/>
</testsuite></testsuites>"""


@pytest.mark.parametrize("module", ["tools.gpu_check", "benchmarks.gpu_check"])
def test_without_cuda_exits_0_and_reports_every_check_skipped(tmp_path, module):
    """A real run with CUDA hidden (and through the old name, an alias): one printed line, a
    report, exit 0, nothing run."""
    out = tmp_path / "report.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--out", str(out)],
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
    assert "0 passed, 0 failed, 7 skipped (no CUDA device)" in report
    assert "Every check was skipped because there is no CUDA device" in report
    assert "-m pytest -m cuda" in report and "--junitxml=" in report
    assert "benchmarks.step --device cuda --quick" in report
    assert "benchmarks.step --device cuda --quick --optimizer adamw" in report
    assert "benchmarks.kept_step_cuda --device cuda --quick" in report
    assert "examples/train_cifar.py" in report


def test_main_without_cuda_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "run_check", lambda check: 1 / 0)  # must not be called
    assert gpu_check.main(["--out", str(tmp_path / "r.md")]) == 0
    assert "skipped (no CUDA device)" in (tmp_path / "r.md").read_text()
    assert gpu_check.main(["--out", str(tmp_path / "r.md"), "--only", "nothing-like-it"]) == 2


def test_main_with_fake_cuda_records_failures_and_exits_1(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "machine_facts", lambda cuda: ["GPU: fake"])
    junit = tmp_path / "cuda-tests.xml"
    junit.write_text(CLEAN)
    outcomes = iter([Outcome(0, 1.0, "."), Outcome(None, 9.0, "", timed_out=True)])
    checks = [Check("a", ["pytest"], 9, "pytest", junit=junit), Check("b", ["b"], 9)]
    monkeypatch.setattr(gpu_check, "build_checks", lambda quick, workdir: checks)
    monkeypatch.setattr(gpu_check, "run_check", lambda check: next(outcomes))
    out = tmp_path / "r.md"
    assert gpu_check.main(["--out", str(out)]) == 1
    report = out.read_text()
    assert "2 checks: 1 passed, 1 failed" in report and "Tests: 1 passed" in report


def test_checks_run_every_cuda_test_in_one_call_and_the_benchmarks(tmp_path):
    checks = {c.name: c for c in gpu_check.build_checks(quick=True, workdir=tmp_path)}
    assert list(checks) == ["CUDA tests (pytest -m cuda)", "step-benchmark",
                            "step-benchmark adamw", "fused-kernel step benchmark",
                            "Triton kernels' static figures (sm_90)", "2:4 kernel benchmark",
                            "train-cifar"]
    assert checks["Triton kernels' static figures (sm_90)"].command[1:] == [
        "-m", "tools.triton_static"]
    tests = checks["CUDA tests (pytest -m cuda)"]
    assert tests.kind == "pytest" and tests.junit == tmp_path / "cuda-tests.xml"
    assert tests.command[1:5] == ["-m", "pytest", "-m", "cuda"]
    assert tests.command[-2:] == [f"--junitxml={tests.junit}", "tests"]
    assert tests.env == {"TRITON_INTERPRET": "0"}  # Triton on CUDA tensors, not the interpreter
    assert checks["step-benchmark"].command[1:] == ["-m", "benchmarks.step", "--device", "cuda",
                                                    "--quick"]
    assert checks["step-benchmark adamw"].command[-2:] == ["--optimizer", "adamw"]
    bench = checks["fused-kernel step benchmark"].command
    assert bench[-4:] == ["benchmarks.kept_step_cuda", "--device", "cuda", "--quick"]
    full = {c.name: c for c in gpu_check.build_checks(quick=False, workdir=tmp_path)}
    assert "--quick" not in full["step-benchmark"].command
    assert full["step-benchmark"].timeout == 2 * checks["step-benchmark"].timeout


def test_semi_structured_check_fails_when_nothing_was_measured(tmp_path):
    semi = {c.name: c for c in gpu_check.build_checks(True, tmp_path)}["2:4 kernel benchmark"]
    line = "semi_structured benchmark: compute capability (7, 5) < (8, 0), nothing can be measured"
    assert not judge(semi, Outcome(0, 1.0, line)).passed
    assert judge(semi, Outcome(0, 1.0, "table")).passed


def test_training_check_writes_cifar_and_reads_the_device_from_metrics(tmp_path):
    train = {c.name: c for c in gpu_check.build_checks(True, tmp_path)}["train-cifar"]
    assert not (tmp_path / "cifar10").exists()  # written only when the check runs
    train.prepare()
    names = sorted(p.name for p in (tmp_path / "cifar10").iterdir())
    assert names == [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    with open(tmp_path / "cifar10" / "test_batch", "rb") as f:
        batch = pickle.load(f)
    assert batch[b"data"].shape == (64, 3072) and len(batch[b"labels"]) == 64
    metrics = tmp_path / "train_cifar" / "metrics.json"
    assert "no metrics.json" in train.verify("")
    metrics.parent.mkdir()
    metrics.write_text('{"device": "cpu"}')
    assert "not on CUDA" in train.verify("")
    metrics.write_text('{"device": "cuda:0"}')
    assert train.verify("") is None


def test_the_cuda_selection_run_on_this_cpu_is_reported_not_verified(tmp_path):
    """The tests check's own command (on two of the files) and judgement, without a GPU:
    every selected test is skipped, so nothing was verified, and the verdict says why."""
    junit = tmp_path / "cuda-tests.xml"
    files = ["tests/test_sgd.py", "tests/test_kernel_ops.py"]
    check = Check("tests", gpu_check.pytest_command(junit, files), 300, "pytest",
                  env={"CUDA_VISIBLE_DEVICES": ""}, junit=junit)
    result = judge(check, run_check(check))
    assert not result.passed, result.outcome.output
    assert set(result.counts) == {"skipped"} and result.counts["skipped"] >= 3
    assert "skipped, so NOT VERIFIED on this machine" in result.reason
    assert "test_ordinary_cuda_steps_read_nothing_back_and_match_the_cpu" in result.reason
    assert "(needs a CUDA device)" in result.reason and "no test passed" in result.reason


def test_a_module_that_cannot_be_imported_fails_the_check_but_not_the_other_tests(tmp_path):
    """A package missing on the GPU machine breaks the import of some test modules; the CUDA
    tests of the others still run (and are counted), and the verdict names the broken one."""
    (tmp_path / "test_broken.py").write_text("import no_such_package_here  # noqa: F401\n")
    (tmp_path / "test_fine.py").write_text(
        "import pytest\n\n\n@pytest.mark.cuda\ndef test_runs():\n    pass\n"
    )
    junit = tmp_path / "cuda-tests.xml"
    files = [str(tmp_path / "test_broken.py"), str(tmp_path / "test_fine.py")]
    check = Check("tests", gpu_check.pytest_command(junit, files), 300, "pytest", junit=junit)
    result = judge(check, run_check(check))
    assert not result.passed, result.outcome.output
    assert result.counts.get("passed") == 1 and result.counts.get("error") == 1
    assert "errored" in result.reason and "test_broken" in result.reason


def test_a_cuda_skip_without_the_marker_is_refused(tmp_path):
    """``tests/conftest.py`` refuses a test skipped for want of CUDA that ``-m cuda`` would not
    select."""
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n"
    )
    test = textwrap.dedent("""
        import pytest

        @pytest.mark.skipif(True, reason="needs a CUDA device")
        def test_on_gpu():
            pass
    """)
    (tmp_path / "test_unmarked.py").write_text(test)
    marked_test = test.replace("@pytest", "@pytest.mark.cuda\n@pytest", 1)
    (tmp_path / "test_marked.py").write_text(marked_test)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
               "--collect-only", "-W", "ignore::pytest.PytestUnknownMarkWarning"]
    refused = subprocess.run([*command, "test_unmarked.py"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert ("skipped without CUDA but not marked @pytest.mark.cuda: "
            "test_unmarked.py::test_on_gpu") in refused.stderr
    marked = subprocess.run([*command, "test_marked.py"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert marked.returncode == 0, marked.stdout + marked.stderr
