"""Studies that reproduce published results with tessel's kernels: run one
with `python -m examples.<study> [--quick] [--device cpu|cuda] [--backend
tessel|reference] [--out DIR]`, or all three quick with `python -m bench science`."""
