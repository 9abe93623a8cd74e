"""MatrixInfer sim package."""
