"""`python -m build --wheel` gives one wheel with the C++ kernels of every
SIMD level; installed on its own, it passes the CPU attention suite (dense
and packed) forced to each level this machine supports."""
import os
import subprocess
import sys

import pytest

from tessel import _dispatch

pytest.importorskip("build")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORTED = [level for level in _dispatch._built_levels() if level in _dispatch.cpp_module().cpu_levels()]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The wheel, built without isolation (torch and pybind11 are those installed), unpacked into a directory."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), ROOT],
                   check=True, capture_output=True, timeout=900)
    (wheel,) = out.glob("tessel-*.whl")
    target = out / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return target


@pytest.mark.parametrize("level", SUPPORTED)
def test_the_wheel_passes_at_every_level(site, level):
    env = {**os.environ, "PYTHONPATH": str(site), "TESSEL_CPU_LEVEL": level}
    where = subprocess.run([sys.executable, "-c", "import tessel; print(tessel.__file__, tessel.cpu_info()['level'])"],
                           env=env, capture_output=True, text=True, check=True).stdout.split()
    assert where[0].startswith(str(site)) and where[1] == level
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-k", "not triton", "-p", "no:cacheprovider",
                           "tests/test_attention.py", "tests/test_attention_varlen.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
