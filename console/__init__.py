"""MatrixInfer console."""
