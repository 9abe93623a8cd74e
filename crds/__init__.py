"""MatrixInfer crds package."""
