"""TLS material: SANs, CA signature, validity checks, key modes, and a real TLS handshake."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509

from fedrg.deploy.certs import (
    check_ca_certificate,
    check_server_certificate,
    init_certs,
    load_certificate,
    make_ca,
    make_server_cert,
    subject_alt_names,
    write_cert,
    write_key,
)
from fedrg.errors import DeployError


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return init_certs(tmp_path_factory.mktemp("certs"), hosts=["fl.example.org", "10.1.2.3"])


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_names_local_and_given_hosts(certs):
    cert = load_certificate(certs.server_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert set(subject_alt_names(cert)) == {"fl.example.org", "localhost", "10.1.2.3",
                                            "127.0.0.1", "::1"}


def test_ca_signs_server_certificate(certs):
    ca = check_ca_certificate(certs.ca_cert)
    cert = load_certificate(certs.server_cert)
    cert.verify_directly_issued_by(ca)  # raises if the signature does not verify
    assert cert.issuer == ca.subject
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    check_server_certificate(certs.server_cert, certs.server_key, certs.ca_cert, host="10.1.2.3")


def test_private_keys_are_owner_only_and_certificates_public(certs):
    assert _mode(certs.ca_key) == 0o600
    assert _mode(certs.server_key) == 0o600
    assert _mode(certs.ca_cert) == 0o644
    assert _mode(certs.server_cert) == 0o644


def test_init_refuses_to_overwrite(certs):
    before = certs.ca_key.read_bytes()
    with pytest.raises(DeployError, match="refusing to overwrite"):
        init_certs(certs.ca_cert.parent)
    assert certs.ca_key.read_bytes() == before


def test_server_certificate_from_another_ca_is_rejected(certs, tmp_path):
    other = init_certs(tmp_path)
    with pytest.raises(DeployError, match="not signed by the CA"):
        check_server_certificate(other.server_cert, other.server_key, certs.ca_cert)
    with pytest.raises(DeployError, match="does not belong"):
        check_server_certificate(certs.server_cert, other.server_key, certs.ca_cert)
    with pytest.raises(DeployError, match="does not name host"):
        check_server_certificate(certs.server_cert, certs.server_key, certs.ca_cert,
                                 host="other.example.org")


def test_expired_and_not_yet_valid_ca_are_refused(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    expired, _ = make_ca(not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1))
    write_cert(tmp_path / "expired.crt", expired)
    with pytest.raises(DeployError, match="expired on"):
        check_ca_certificate(tmp_path / "expired.crt")
    future, _ = make_ca(not_before=now + dt.timedelta(days=2), not_after=now + dt.timedelta(days=9))
    write_cert(tmp_path / "future.crt", future)
    with pytest.raises(DeployError, match="not valid before"):
        check_ca_certificate(tmp_path / "future.crt")
    # the same files pass at a time inside their window
    check_ca_certificate(tmp_path / "future.crt", now=now + dt.timedelta(days=3))


def test_wrong_files_as_ca_certificate_are_named(certs, tmp_path):
    with pytest.raises(DeployError, match="does not exist"):
        check_ca_certificate(tmp_path / "missing.crt")
    with pytest.raises(DeployError, match="not a PEM certificate"):
        check_ca_certificate(certs.server_key)
    with pytest.raises(DeployError, match="not a CA certificate"):
        check_ca_certificate(certs.server_cert)


def _tls_server(cert, key) -> tuple[int, threading.Thread, list]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.settimeout(10)
    errors: list = []

    def serve():
        with sock:
            for _ in range(3):
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (ssl.SSLError, OSError) as err:
                    errors.append(err)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return sock.getsockname()[1], t, errors


def _handshake(port: int, cafile, server_hostname: str) -> bytes:
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
        return tls.recv(2)


def test_real_tls_handshake_trusts_only_the_federation_ca(certs, tmp_path):
    port, thread, _ = _tls_server(certs.server_cert, certs.server_key)
    assert _handshake(port, certs.ca_cert, "127.0.0.1") == b"ok"
    assert _handshake(port, certs.ca_cert, "localhost") == b"ok"
    other = init_certs(tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(port, other.ca_cert, "localhost")
    thread.join(timeout=10)


def test_server_certificate_lifetime_is_capped_by_the_ca(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    ca, ca_key = make_ca(days=30)
    cert, key = make_server_cert(ca, ca_key, ["localhost"], days=825)
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc
    assert cert.not_valid_after_utc > now + dt.timedelta(days=29)
    write_key(tmp_path / "k.pem", key)
    assert _mode(tmp_path / "k.pem") == 0o600
