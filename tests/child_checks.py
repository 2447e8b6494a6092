"""Checks run in a child process: the test file re-runs itself with
``--child``, which prints one line ``MARK + json {check: None or a traceback}``.
Used where a check must not share the pytest process (a PrivateUse1 device
registers once per process)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_child_checks(script: str, *, mark: str, env: dict, cwd: str, timeout: float,
                     what: str) -> dict:
    """{check: None (passed) or its traceback} from ``python script --child``;
    a hang or a death fails the test, naming ``what`` and the child's stderr."""
    try:
        res = subprocess.run([sys.executable, "-X", "faulthandler", script, "--child"],
                             capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what} hung past {timeout} s:\n{(e.stderr or '')[-4000:]}")
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(mark)]
    if res.returncode != 0 or not lines:
        pytest.fail(f"{what}' process died (exit status {res.returncode}; a negative one is a "
                    f"signal, e.g. -11 a segfault):\n{res.stderr[-6000:]}")
    return json.loads(lines[-1][len(mark):])


def fail_on_failed(outcomes: dict, what: str) -> None:
    """Fail listing every check whose outcome is a traceback."""
    failed = {k: v for k, v in outcomes.items() if v is not None}
    if failed:
        pytest.fail(f"{len(failed)} of {len(outcomes)} {what} failed: {sorted(failed)}\n\n"
                    + "\n".join(f"--- {k}\n{v}" for k, v in failed.items()), pytrace=False)
