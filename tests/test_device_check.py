"""tools/device_check.sh: the one call that runs the CUDA checks on a bare GPU machine. Its
install and checks need that machine; here, the mistake a session makes before the call."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "device_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_without_the_carried_wheels_it_says_what_to_run_and_installs_nothing(tmp_path):
    """Forgetting ``make device-wheels`` (or ``carry: [".device"]``) costs no device time on a
    failed install: the script stops first, naming both."""
    site = tmp_path / "site"
    done = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path),
                                           "SITE": str(site), "PYTHON": "false"})
    assert done.returncode == 2
    assert "make device-wheels" in done.stderr and "carry .device" in done.stderr
    assert not site.exists()


def test_the_makefile_fetches_the_wheels_the_script_reads():
    makefile = (ROOT / "Makefile").read_text()
    assert "device-wheels:" in makefile and "-d .device/wheels" in makefile
    assert "WHEELS=.device/wheels" in SCRIPT.read_text()
    assert ".device/" in (ROOT / ".gitignore").read_text().splitlines()
