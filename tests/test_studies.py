"""The studies' quick modes (what a researcher runs first): each must reach
its qualitative result, checked by the study's own checks."""
import json

import pytest

pytest.importorskip("matplotlib")  # the studies plot; the GPU image may lack it

from examples import laser_lm, looped_icl, markov  # noqa: E402


@pytest.mark.parametrize("study", [markov, looped_icl, laser_lm], ids=["markov", "looped_icl", "laser_lm"])
def test_quick_mode_reaches_the_expected_result(study, tmp_path):
    name = study.__name__.rsplit(".", 1)[-1]
    metrics = study.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert json.loads((tmp_path / f"{name}.json").read_text())["study"] == name
    failed = [(check, measured) for check, measured, good in study.checks(metrics) if not good]
    assert not failed, failed
