"""MatrixInfer controllers package."""
