"""The studies' quick modes (what a researcher runs first): each must reach
its qualitative result, checked by the study's own checks."""
import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")  # the studies plot; the GPU image may lack it

from examples import laser_lm, looped_icl, markov  # noqa: E402


@pytest.mark.parametrize("study", [markov, looped_icl, laser_lm], ids=["markov", "looped_icl", "laser_lm"])
def test_quick_mode_reaches_the_expected_result(study, tmp_path):
    name = study.__name__.rsplit(".", 1)[-1]
    metrics = study.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    written = json.loads((tmp_path / f"{name}.json").read_text())
    assert written["study"] == name and written["checks"] == metrics["checks"]
    assert all(set(c) == {"name", "value", "threshold", "passed"} for c in written["checks"])
    failed = [c for c in written["checks"] if not c["passed"]]
    assert not failed, failed


def test_laser_lm_runs_under_torchrun(tmp_path):
    """The ecosystem's launcher: env:// rendezvous, one process per worker, rank 0 reports."""
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "examples.laser_lm", "--quick", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads((tmp_path / "laser_lm.json").read_text())
    assert written["world"] == 2 and all(c["passed"] for c in written["checks"]), written["checks"]
