"""MatrixInfer extproc package."""
