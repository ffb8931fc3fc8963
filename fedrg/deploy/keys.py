"""A hospital's keys: Flower node-authentication key pair and the ledger signing key.

``fedrg keys new --out DIR`` writes

- ``node_auth``           ECDSA P-384 private key, OpenSSH format (0600). The SuperNode signs
  its requests with it (``--auth-supernode-private-key``). Never leaves the hospital.
- ``node_auth.pub``       its public key, OpenSSH format (``ecdsa-sha2-nistp384 ...``). Send it
  to the federation operator, who registers it (``flwr supernode register``).
- ``ledger_ed25519.pem``  Ed25519 private key, PKCS8 PEM (0600): signs the privacy ledger.
- ``ledger_ed25519.pub``  its public key (SubjectPublicKeyInfo PEM), for auditors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrg.deploy.files import check_private_mode, write_private, write_public
from fedrg.errors import DeployError
from fedrg.signing import write_keypair

NODE_KEY, NODE_PUB = "node_auth", "node_auth.pub"
LEDGER_KEY, LEDGER_PUB = "ledger_ed25519.pem", "ledger_ed25519.pub"


@dataclass(frozen=True)
class HospitalKeys:
    """Where :func:`new_hospital_keys` wrote its files."""

    node_private: Path
    node_public: Path
    ledger_private: Path
    ledger_public: Path


def new_node_keypair(
    private_path: str | Path, public_path: str | Path, *, comment: str = "fedrg-node",
    overwrite: bool = False,
) -> ec.EllipticCurvePrivateKey:
    """Write a node-authentication key pair in the form Flower loads (OpenSSH, NIST P-384).

    Parameters
    ----------
    private_path, public_path : str or Path
        Destination files; the private one gets mode 0600.
    comment : str
        Appended to the public key line (e.g. the hospital name).
    overwrite : bool
        Replace existing files.

    Returns
    -------
    EllipticCurvePrivateKey
    """
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_private(private_path, priv, overwrite=overwrite)
    write_public(public_path, pub + f" {comment}\n".encode(), overwrite=overwrite)
    return key


def new_hospital_keys(
    out_dir: str | Path, *, name: str = "hospital", overwrite: bool = False
) -> HospitalKeys:
    """Write a hospital's node-authentication and ledger-signing key pairs into ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Usually the hospital's state directory (made mode 0700).
    name : str
        Hospital name, used as the public key comment.
    overwrite : bool
        Replace an existing node-authentication key (the operator must then register the
        new public key). An existing ledger key is always kept: a new one would orphan the
        ledger it signed (:func:`fedrg.signing.write_keypair` refuses too).

    Returns
    -------
    HospitalKeys
    """
    out = Path(out_dir)
    keys = HospitalKeys(out / NODE_KEY, out / NODE_PUB, out / LEDGER_KEY, out / LEDGER_PUB)
    if not overwrite and (keys.node_private.exists() or keys.node_public.exists()):
        raise DeployError(
            f"{keys.node_private} already exists; refusing to overwrite the node key. Choose "
            "another --out directory, or pass --force and register the new node_auth.pub"
        )
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    new_node_keypair(keys.node_private, keys.node_public, comment=name, overwrite=overwrite)
    if not keys.ledger_private.exists():
        write_keypair(keys.ledger_private, keys.ledger_public)
    return keys


def load_node_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """Load a node-authentication private key the way Flower's SuperNode does, with clear errors.

    Raises
    ------
    DeployError
        Missing file, readable by others, not an OpenSSH EC key.
    """
    p = Path(path)
    if not p.is_file():
        raise DeployError(
            f"node authentication key {p} does not exist; create it with "
            f"`fedrg keys new --out {p.parent}` and send node_auth.pub to the federation operator"
        )
    check_private_mode(p)
    try:
        key = serialization.load_ssh_private_key(p.read_bytes(), password=None)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise DeployError(
            f"{p} is not an unencrypted OpenSSH private key ({err}); use the node_auth file "
            "from `fedrg keys new`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(
            f"{p} holds a {type(key).__name__}; Flower node authentication needs a NIST EC key "
            "(ECDSA P-384 from `fedrg keys new`)"
        )
    return key


def load_node_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """Load an OpenSSH NIST EC public key (a hospital's ``node_auth.pub``)."""
    p = Path(path)
    if not p.is_file():
        raise DeployError(
            f"hospital public key {p} does not exist; ask the hospital for the node_auth.pub "
            "written by `fedrg keys new`"
        )
    try:
        key = serialization.load_ssh_public_key(p.read_bytes().strip())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise DeployError(
            f"{p} is not an OpenSSH public key ({err}); expected a line starting with "
            "'ecdsa-sha2-nistp384'"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DeployError(f"{p} holds a {type(key).__name__}; expected an ECDSA (NIST) public key")
    return key


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 fingerprint of a public key (hex of its OpenSSH wire form), for logs and docs."""
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return "SHA256:" + hashlib.sha256(blob).hexdigest()[:32]
