"""Benchmarks that print side-by-side ratios. Run each from the checkout as a module: `python -m bench.NAME`."""
