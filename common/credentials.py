"""Certificates and device keys for a deployment, made with `cryptography`.

A private CA signs the SuperLink's TLS certificate, whose subject alternative names are the host
names and IP addresses devices use to reach it (plus localhost and 127.0.0.1). Each device has
an EC P-384 key pair: the SuperNode signs its requests with the private key, and the SuperLink
accepts only public keys registered with `flwr supernode register` (OpenSSH format).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
LOOPBACK = ("localhost", "127.0.0.1", "::1")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str, what: str = "device name") -> str:
    """A name safe for file names and logs: letters, digits, '.', '_' and '-'."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit."
        )
    return name


def create_ca(directory: Path, *, common_name: str = "fedrec CA", days: int = 3650) -> Path:
    """A self-signed CA (ca.crt, ca.key) in directory; the certificate's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    _write_private(Path(directory) / CA_KEY, _private_pem(key))
    path = Path(directory) / CA_CERT
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def create_server_certificate(directory: Path, *, hosts: Sequence[str], days: int = 825) -> Path:
    """server.crt and server.key in directory, signed by its CA, valid for hosts + loopback."""
    directory = Path(directory)
    ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    names = list(dict.fromkeys([*hosts, *LOOPBACK]))
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(directory / SERVER_KEY, _private_pem(key))
    path = directory / SERVER_CERT
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def certificate_names(path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in sans.get_values_for_type(x509.DNSName)] + [
        str(v) for v in sans.get_values_for_type(x509.IPAddress)
    ]


def create_device_key(directory: Path, name: str) -> tuple[Path, Path]:
    """NAME.key (private, mode 600) and NAME.pub (OpenSSH) in directory; both paths."""
    check_name(name)
    directory = Path(directory)
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    if private.exists() or public.exists():
        raise FileExistsError(f"A key for {name!r} already exists in {directory}.")
    key = ec.generate_private_key(ec.SECP384R1())
    # flower-supernode reads the OpenSSH private format (load_ssh_private_key)
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public


def check_public_key(path: Path) -> str:
    """Validate an OpenSSH EC public key file; its SHA-256 fingerprint (hex)."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path} is not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(
            f"{path} holds a {type(key).__name__}; SuperNode authentication needs an EC key "
            "(P-384): make one with `fedrec-client keygen`."
        )
    raw = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(raw).hexdigest()


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (created with mode 600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
