"""Certificates and device keys, and the server's config and device registry (no processes)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from common import credentials
from common.flower.config import ConfigError
from server import deploy


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path: Path) -> None:
    credentials.create_ca(tmp_path)
    credentials.create_server_certificate(tmp_path, hosts=["fedrec.example.org", "10.0.0.7"])
    names = credentials.certificate_names(tmp_path / credentials.SERVER_CERT)
    assert set(names) == {"fedrec.example.org", "localhost", "10.0.0.7", "127.0.0.1", "::1"}
    ca = x509.load_pem_x509_certificate((tmp_path / credentials.CA_CERT).read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / credentials.SERVER_CERT).read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the signature does not check out
    for key in (credentials.CA_KEY, credentials.SERVER_KEY):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600


def test_device_keys_are_the_formats_flower_reads(tmp_path: Path) -> None:
    private, public = credentials.create_device_key(tmp_path, "phone-1")
    # flower-supernode: load_ssh_private_key; flwr supernode register: load_ssh_public_key
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert serialization.load_ssh_public_key(public.read_bytes()) == key.public_key()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert len(credentials.check_public_key(public)) == 64
    with pytest.raises(FileExistsError):
        credentials.create_device_key(tmp_path, "phone-1")


def test_bad_names_and_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        credentials.check_name("../etc")
    rsa_pub = tmp_path / "rsa.pub"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    rsa_pub.write_bytes(
        rsa_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(ValueError, match="EC key"):
        credentials.check_public_key(rsa_pub)
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(ValueError, match="not an OpenSSH public key"):
        credentials.check_public_key(tmp_path / "junk.pub")


def test_device_registry_add_revoke_and_readd(tmp_path: Path) -> None:
    home = deploy.ServerHome(tmp_path / "srv")
    deploy.init_home(home, hosts=["localhost"])
    with pytest.raises(ConfigError, match="already holds a CA"):
        deploy.init_home(home, hosts=["localhost"])
    first = deploy.add_device(home, "dev-a")
    assert first["status"] == "active" and first["node_id"] is None
    assert (home.devices / "dev-a.key").exists()
    with pytest.raises(deploy.DeviceError, match="already registered"):
        deploy.add_device(home, "dev-a")
    assert deploy.revoke_device(home, "dev-a")["status"] == "revoked"
    # A revoked key can never be registered again: re-adding makes a new pair
    again = deploy.add_device(home, "dev-a")
    assert again["status"] == "active" and again["fingerprint"] != first["fingerprint"]
    with pytest.raises(deploy.DeviceError, match="No device"):
        deploy.revoke_device(home, "nobody")


def test_run_config_has_deployment_defaults_and_is_checked(tmp_path: Path) -> None:
    config = tmp_path / "deploy.toml"
    config.write_text("[run]\nnum-server-rounds = 3\n")
    values = deploy.load_run_config(config, {"min-nodes": 5})
    assert values["num-server-rounds"] == 3 and values["min-nodes"] == 5
    assert values["push-model"] is True and values["central-eval"] is False
    config.write_text("[run]\nnum-server-rounds = 0\n")
    with pytest.raises(ConfigError, match="num-server-rounds must be at least 1"):
        deploy.load_run_config(config, {})
    config.write_text("[federation]\nnum-supernodes = 3\n")
    with pytest.raises(ConfigError, match="only a \\[run\\] table"):
        deploy.load_run_config(config, {})
    with pytest.raises(ConfigError, match="Unknown config key"):
        deploy.load_run_config(None, {"rounds": 3})


def test_the_server_home_may_not_be_packed_into_the_app(tmp_path: Path) -> None:
    home = deploy.ServerHome(deploy.PROJECT_DIR / "server" / "certs-here")
    with pytest.raises(ConfigError, match="private keys"):
        deploy.run(home, run_config={"min-nodes": 2}, output=tmp_path / "out")
    assert not home.root.exists()
