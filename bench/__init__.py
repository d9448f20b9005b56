"""tessel benchmarks: `python -m bench <suite>` compares every kernel with its
reference and its peers, side by side in one run."""
