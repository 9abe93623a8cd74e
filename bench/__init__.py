"""MatrixInfer benchmarks: each runs as `python -m bench.<name>`; reports in bench/reports/."""
