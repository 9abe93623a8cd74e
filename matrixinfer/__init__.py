"""MatrixInfer matrixinfer package."""
