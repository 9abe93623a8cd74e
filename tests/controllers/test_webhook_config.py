"""The webhook server's command line and certificate (no server started)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import kopf
import pytest
from cryptography import x509

from controllers.main import make_settings, parse_args
from controllers.webhooks.certs import self_signed
from controllers.webhooks.handlers import MANAGED, Reader, WebhookConfig, configure


def test_flags_turn_the_webhooks_on() -> None:
    assert parse_args([]).webhooks is None  # off unless a port is given
    config = parse_args(
        ["--webhook-port", "9443", "--webhook-host", "mi-controllers.mi.svc"]
    ).webhooks
    assert config == WebhookConfig(port=9443, host="mi-controllers.mi.svc", managed=MANAGED)
    config = parse_args(["--webhook-port", "9443", "--webhook-configuration", ""]).webhooks
    assert config is not None and config.managed is None


def test_settings_serve_and_manage(tmp_path: Path) -> None:
    cfg = parse_args(["--webhook-port", "9443", "--webhook-host", "mi.svc"])
    settings = make_settings(cfg)
    server = settings.admission.server
    assert isinstance(server, kopf.WebhookServer)
    assert (server.port, server.host, server.addr) == (9443, "mi.svc", "0.0.0.0")
    assert settings.admission.managed == MANAGED
    assert make_settings(parse_args([])).admission.server is None


def test_self_signed_certificate(tmp_path: Path) -> None:
    cert = self_signed(["mi.svc", "127.0.0.1"], tmp_path)
    parsed = x509.load_pem_x509_certificate(cert.certfile.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mi.svc"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert stat.S_IMODE(cert.keyfile.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="at least one host name"):
        self_signed([], tmp_path)


def test_given_cert_dir_must_hold_the_files(tmp_path: Path) -> None:
    settings = kopf.OperatorSettings()
    with pytest.raises(ValueError, match=r"--webhook-cert-dir: .*tls\.crt is missing"):
        configure(settings, WebhookConfig(port=9443, cert_dir=str(tmp_path)))
    cert = self_signed(["x.svc"], tmp_path)
    configure(settings, WebhookConfig(port=9443, cert_dir=str(tmp_path)))
    server = settings.admission.server
    assert isinstance(server, kopf.WebhookServer)
    assert server.certfile == str(cert.certfile) and server.pkeyfile == str(cert.keyfile)


async def test_reader_without_login_denies_with_503() -> None:
    with pytest.raises(kopf.AdmissionError, match="cannot read ModelRoutes yet") as err:
        await Reader(["ns"]).items("ModelRoute")
    assert err.value.code == 503
