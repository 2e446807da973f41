"""modfuse benchmarks: `python -m bench` prints side-by-side tables; bench/test_microbench.py is pytest-benchmark."""
