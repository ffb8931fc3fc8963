"""A hospital's keys: Flower accepts the node key with its own loaders; modes; ledger key format."""

from __future__ import annotations

import argparse
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedrg.deploy.keys import (
    fingerprint,
    load_node_private_key,
    load_node_public_key,
    new_hospital_keys,
)
from fedrg.errors import DeployError
from fedrg.signing import load_private_key, load_public_key, sign, verify


@pytest.fixture
def keys(tmp_path):
    return new_hospital_keys(tmp_path / "h1", name="hospital-1")


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_modes(keys):
    assert _mode(keys.node_private) == 0o600
    assert _mode(keys.ledger_private) == 0o600
    assert _mode(keys.node_public) == 0o644
    assert _mode(keys.node_private.parent) == 0o700


def test_node_key_is_openssh_p384(keys):
    assert keys.node_private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    line = keys.node_public.read_text().split()
    assert line[0] == "ecdsa-sha2-nistp384" and line[2] == "hospital-1"
    priv = load_node_private_key(keys.node_private)
    assert isinstance(priv.curve, ec.SECP384R1)
    assert load_node_public_key(keys.node_public).public_numbers() == \
        priv.public_key().public_numbers()


def test_flower_loads_the_node_keys_with_its_own_code(keys):
    """The exact functions Flower's CLI and SuperNode use to read these files."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    pub_bytes = try_load_public_key(keys.node_public)
    args = argparse.Namespace(auth_supernode_private_key=str(keys.node_private),
                              auth_supernode_public_key=None)
    priv, pub = _try_setup_client_authentication(args)
    assert public_key_to_bytes(pub) == pub_bytes  # the SuperLink matches on these bytes
    assert isinstance(priv, ec.EllipticCurvePrivateKey)


def test_ledger_key_matches_the_contract(keys):
    pem = keys.ledger_private.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    key = load_private_key(keys.ledger_private)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    pub = load_public_key(keys.ledger_public)
    assert verify(pub, b"entry", sign(key, b"entry"))
    assert keys.ledger_private.name == "ledger_ed25519.pem"
    assert keys.ledger_public.name == "ledger_ed25519.pub"


def test_no_silent_overwrite_and_force_keeps_the_ledger_key(keys):
    node_before = keys.node_private.read_bytes()
    ledger_before = keys.ledger_private.read_bytes()
    with pytest.raises(DeployError, match="refusing to overwrite"):
        new_hospital_keys(keys.node_private.parent)
    assert keys.node_private.read_bytes() == node_before
    again = new_hospital_keys(keys.node_private.parent, overwrite=True)
    assert again.node_private.read_bytes() != node_before  # node key rotated
    assert again.ledger_private.read_bytes() == ledger_before  # ledger key never replaced
    assert _mode(again.node_private) == 0o600


def test_load_errors_name_the_file_and_fix(keys, tmp_path):
    with pytest.raises(DeployError, match="fedrg keys new"):
        load_node_private_key(tmp_path / "nope")
    keys.node_private.chmod(0o644)
    with pytest.raises(DeployError, match="chmod 600"):
        load_node_private_key(keys.node_private)
    keys.node_private.chmod(0o600)
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption())
    bad = tmp_path / "ed_key"
    bad.write_bytes(ed)
    bad.chmod(0o600)
    with pytest.raises(DeployError, match="NIST EC"):
        load_node_private_key(bad)
    with pytest.raises(DeployError, match="not an OpenSSH public key"):
        load_node_public_key(keys.ledger_public)


def test_fingerprint_is_stable_and_distinguishes_keys(keys, tmp_path):
    other = new_hospital_keys(tmp_path / "h2")
    a = fingerprint(load_node_public_key(keys.node_public))
    assert a == fingerprint(load_node_private_key(keys.node_private).public_key())
    assert a != fingerprint(load_node_public_key(other.node_public))
