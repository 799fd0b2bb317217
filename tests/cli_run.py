"""Run a `useg` stage as a subprocess, as DVC would: the one helper the stage-chain tests share.

Not a test module (pytest collects `test_*.py` only); the test files import it from their own
directory, which pytest's default import mode puts on `sys.path`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def useg(cwd: Path, *args: str, params: str = "params.yaml", ok: bool = True,
         timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m stages.cli ARGS --params PARAMS` in `cwd`, quiet, on this checkout's code.

    With `ok` (the default) a non-zero exit fails the test with the tail of both streams."""
    env = dict(os.environ, USEG_QUIET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "stages.cli", *args, "--params", params], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if ok:
        assert r.returncode == 0, f"useg {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r
