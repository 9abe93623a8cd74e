"""The webhook server's certificate: self-signed by the operator unless one is given.

The certificate is its own CA (Kopf puts it in the webhook configurations' ``caBundle``), valid
for the names and addresses the API server may use to reach the operator, for one year; a new
one is made at every start, so nothing needs rotating.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["ServingCert", "self_signed"]

VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True, slots=True)
class ServingCert:
    certfile: Path  # PEM certificate (also the CA bundle when self-signed)
    keyfile: Path  # PEM private key


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def self_signed(names: Iterable[str], directory: Path | None = None) -> ServingCert:
    """Make a key and a self-signed certificate for ``names`` (DNS names or IP addresses; the
    first is the common name) and write them to ``directory`` (default: a new private temporary
    directory), the key readable by this user only."""
    sans = list(dict.fromkeys(n for n in names if n))
    if not sans:
        raise ValueError("a serving certificate needs at least one host name or address")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0][:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    out = directory or Path(tempfile.mkdtemp(prefix="matrixinfer-webhook-"))
    out.mkdir(parents=True, exist_ok=True)
    certfile, keyfile = out / "tls.crt", out / "tls.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return ServingCert(certfile, keyfile)
