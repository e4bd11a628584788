"""A plain model under DDP (gloo on the CPU, started by torchrun) trains on stoker's batches without
the "grad strides do not match bucket view strides" warning: images come as contiguous NCHW, like a
DataLoader's, unless the trainer asks for channels-last."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "tests" / "scripts" / "ddp_steps.py"
WARNING = "Grad strides do not match bucket view strides"


def torchrun(endpoint: str, *extra: str) -> subprocess.CompletedProcess[str]:
    launcher = Path(sys.executable).parent / "torchrun"
    command = [str(launcher) if launcher.exists() else shutil.which("torchrun") or "torchrun"]
    command += ["--nproc-per-node=2", "--standalone", str(SCRIPT), endpoint, "3", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_ddp_trains_on_default_batches_without_a_stride_warning(cluster) -> None:
    server = cluster.start()
    result = torchrun(server.data)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    seen = [i for r in ranks for i in r["indices"]]
    assert len(seen) == len(set(seen)) == 2 * 3 * 4, "the ranks trained on different samples"
    assert WARNING not in result.stderr, result.stderr[-3000:]
    # The same steps on channels-last images do warn: the check above can see the warning.
    contrast = torchrun(server.data, "channels_last")
    assert contrast.returncode == 0, contrast.stderr[-3000:]
    assert WARNING in contrast.stderr
