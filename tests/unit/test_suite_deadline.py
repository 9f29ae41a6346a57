"""The suite survives a hung test: with the project's pytest settings, a test past its deadline fails on its
own and the run goes on to the next test and ends with its counts."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_test_past_its_deadline_fails_alone_and_the_run_ends_with_counts(tmp_path):
    (tmp_path / "test_hang.py").write_text(
        "import time\n\n"
        "def test_hangs():\n    time.sleep(60)\n\n"
        "def test_after_it():\n    assert 1 + 1 == 2\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                           str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), "--timeout", "2",
                           str(tmp_path / "test_hang.py")], capture_output=True, text=True, timeout=50)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "1 failed, 1 passed" in out, out
    assert "Timeout" in out, out
