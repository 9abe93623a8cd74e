"""Admission webhooks for the five MatrixInfer kinds: pure rules (`rules`) behind thin Kopf
handlers (`handlers`), served over HTTPS with a certificate the operator makes (`certs`)."""
