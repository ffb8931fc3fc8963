"""TLS material for a federation: a private CA and the SuperLink's server certificate.

``fedrg certs init --out DIR`` writes

- ``ca.crt``      the CA certificate (public; every hospital gets a copy),
- ``ca.key``      the CA private key (0600; keep it offline, it can mint server certificates),
- ``server.pem``  the SuperLink certificate, signed by the CA, with subject alternative names
  for ``localhost``, ``127.0.0.1``, ``::1`` and every ``--host`` name,
- ``server.key``  the SuperLink private key (0600; stays on the server).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrg.deploy.files import write_private, write_public
from fedrg.errors import DeployError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"


@dataclass(frozen=True)
class CertPaths:
    """Where :func:`init_certs` wrote its files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(
    common_name: str = "fedrg federation CA",
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    days: int = 3650,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create a self-signed CA certificate and its ECDSA P-384 key.

    Parameters
    ----------
    common_name : str
        Subject CN of the CA.
    not_before, not_after : datetime, optional
        Validity window (UTC). Defaults: now - 5 min (clock skew) to now + ``days``.
    days : int
        Lifetime when ``not_after`` is not given.

    Returns
    -------
    tuple
        ``(certificate, private_key)``.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    start = not_before or _now() - dt.timedelta(minutes=5)
    end = not_after or _now() + dt.timedelta(days=days)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def make_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    days: int = 825,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create a TLS server certificate signed by the CA, with ``hosts`` as SANs.

    Parameters
    ----------
    ca_cert, ca_key
        The issuing CA (from :func:`make_ca`).
    hosts : sequence of str
        DNS names and IP addresses the SuperLink is reached under. The first one is also
        the subject CN.
    days : int
        Lifetime when ``not_after`` is not given.
    not_before, not_after : datetime, optional
        Validity window (UTC).

    Returns
    -------
    tuple
        ``(certificate, private_key)``.
    """
    if not hosts:
        raise DeployError("a server certificate needs at least one host name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - dt.timedelta(minutes=5)
    end = not_after or min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([_san_entry(h) for h in dict.fromkeys(hosts)]),
            critical=False,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def init_certs(
    out_dir: str | Path,
    *,
    hosts: Sequence[str] = (),
    days: int = 825,
    overwrite: bool = False,
) -> CertPaths:
    """Write a new CA and a SuperLink server certificate into ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Directory to write ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` into.
    hosts : sequence of str
        Extra DNS names / IP addresses of the SuperLink (added to localhost, 127.0.0.1, ::1).
    days : int
        Lifetime of the server certificate.
    overwrite : bool
        Replace existing files.

    Returns
    -------
    CertPaths
    """
    out = Path(out_dir)
    paths = CertPaths(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    if not overwrite:
        existing = [str(p) for p in vars(paths).values() if p.exists()]
        if existing:
            raise DeployError(
                f"{', '.join(existing)} already exist(s); refusing to overwrite. "
                "Choose another --out directory or pass --force"
            )
    all_hosts = [*dict.fromkeys([*hosts, *DEFAULT_HOSTS])]
    ca_cert, ca_key = make_ca()
    srv_cert, srv_key = make_server_cert(ca_cert, ca_key, all_hosts, days=days)
    write_private(paths.ca_key, _pem_key(ca_key), overwrite=True)
    write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), overwrite=True)
    write_private(paths.server_key, _pem_key(srv_key), overwrite=True)
    write_public(
        paths.server_cert, srv_cert.public_bytes(serialization.Encoding.PEM), overwrite=True
    )
    return paths


def write_cert(path: str | Path, cert: x509.Certificate, *, overwrite: bool = False) -> Path:
    """Write a certificate as PEM (mode 0644)."""
    return write_public(path, cert.public_bytes(serialization.Encoding.PEM), overwrite=overwrite)


def write_key(
    path: str | Path, key: ec.EllipticCurvePrivateKey, *, overwrite: bool = False
) -> Path:
    """Write a private key as unencrypted PKCS8 PEM (mode 0600)."""
    return write_private(path, _pem_key(key), overwrite=overwrite)


def load_certificate(path: str | Path) -> x509.Certificate:
    """Read one PEM certificate, with an error naming the file when it is not one."""
    p = Path(path)
    if not p.is_file():
        raise DeployError(
            f"certificate file {p} does not exist; copy the federation's ca.crt there "
            "(made by `fedrg certs init`) or fix the path in your config"
        )
    try:
        return x509.load_pem_x509_certificate(p.read_bytes())
    except ValueError as err:
        raise DeployError(
            f"{p} is not a PEM certificate ({err}); it must start with "
            "'-----BEGIN CERTIFICATE-----' (use ca.crt from `fedrg certs init`, not a key)"
        ) from None


def check_validity(cert: x509.Certificate, path: str | Path, *, now: dt.datetime | None = None):
    """Raise :class:`DeployError` when ``cert`` is expired or not yet valid."""
    t = now or _now()
    if t < cert.not_valid_before_utc:
        raise DeployError(
            f"certificate {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            "UTC; check this machine's clock or ask the federation operator for a current one"
        )
    if t > cert.not_valid_after_utc:
        raise DeployError(
            f"certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "ask the federation operator for a renewed ca.crt (`fedrg certs init`)"
        )


def check_ca_certificate(path: str | Path, *, now: dt.datetime | None = None) -> x509.Certificate:
    """Check that ``path`` holds a currently valid CA certificate, and return it.

    Parameters
    ----------
    path : str or Path
        The root certificate a SuperNode uses to verify the SuperLink.
    now : datetime, optional
        Reference time (UTC); defaults to the current time.

    Raises
    ------
    DeployError
        Missing file, not a certificate, not a CA, expired or not yet valid.
    """
    cert = load_certificate(path)
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise DeployError(
            f"{path} is not a CA certificate (it is the certificate of "
            f"'{cert.subject.rfc4514_string()}'); use the federation's ca.crt as root certificate"
        )
    check_validity(cert, path, now=now)
    return cert


def check_server_certificate(
    cert_path: str | Path,
    key_path: str | Path,
    ca_path: str | Path,
    *,
    host: str | None = None,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Check a server certificate: valid now, signed by the CA, matches its key, names ``host``.

    Raises
    ------
    DeployError
        With the file and the fix.
    """
    ca = check_ca_certificate(ca_path, now=now)
    cert = load_certificate(cert_path)
    check_validity(cert, cert_path, now=now)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise DeployError(
            f"server certificate {cert_path} is not signed by the CA {ca_path}; "
            "make both with the same `fedrg certs init`"
        ) from None
    kp = Path(key_path)
    if not kp.is_file():
        raise DeployError(f"server key {kp} does not exist; it is written by `fedrg certs init`")
    try:
        key = serialization.load_pem_private_key(kp.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise DeployError(f"server key {kp} cannot be read as an unencrypted PEM key: {err}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != cert.public_key(
    ).public_bytes(serialization.Encoding.DER, pub):
        raise DeployError(f"server key {kp} does not belong to certificate {cert_path}")
    if host is not None and host not in subject_alt_names(cert):
        raise DeployError(
            f"server certificate {cert_path} does not name host {host!r} (it names "
            f"{', '.join(subject_alt_names(cert))}); rerun `fedrg certs init --host {host}`"
        )
    return cert


def subject_alt_names(cert: x509.Certificate) -> list[str]:
    """DNS names and IP addresses in the certificate's subjectAltName, as strings."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return [*dns, *ips]
