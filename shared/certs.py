"""A small certificate authority for the bus: nats-server's TLS and every client's mTLS.

`cumulus certs init DIR` and `Stack(tls=True)` make a CA (`ca.crt`, `ca.key` 0600) with
`make_ca`; `issue` signs a server certificate (its hosts and IPs as subject alternative names)
or a client certificate (one per identity: nats-server requires one from every client, workers
included, so a stolen nkey seed alone does not get onto the bus). Keys are ECDSA P-256,
written 0600 and never leave their directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import InvalidArgument

CA_DAYS = 3650
CERT_DAYS = 825
"""Validity of a certificate `issue` signs (the browsers' ceiling; renew with `issue` again)."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner may read (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Cumulus"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(directory: Path, name: str = "Cumulus CA") -> Issued:
    """A new CA in `directory` (`ca.crt`, `ca.key` 0600); refuses to replace an existing one
    (every certificate it signed would stop working)."""
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    if cert_path.exists() or key_path.exists():
        raise InvalidArgument(
            f"{directory} already holds a CA ({cert_path.name}); issue certificates from it "
            "with `cumulus certs issue`, or choose another directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
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
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_bytes(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert=cert_path, key=key_path)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    if not cert_path.exists() or not key_path.exists():
        raise InvalidArgument(
            f"No CA in {directory}: make one with `cumulus certs init {directory}`"
        )
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument(f"{key_path} is not an EC key made by `cumulus certs init`")
    return cert, key


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue(
    directory: Path,
    name: str,
    *,
    server: bool = False,
    hosts: Iterable[str] = (),
    out: Path | None = None,
    days: int = CERT_DAYS,
) -> Issued:
    """A certificate for `name` signed by the CA in `directory`: `<out>/<name>.crt` and
    `<name>.key` (0600), `out` being `directory` unless given. A server certificate names
    its `hosts` (DNS names or IP addresses) and is for server authentication and for the
    cluster routes it dials (nats-server routes are mutual TLS: the dialling server presents
    its certificate as a client); otherwise it is a client certificate (mTLS)."""
    if not name or "/" in name or name.startswith("."):
        raise InvalidArgument(f"Invalid certificate name {name!r}")
    hosts = list(hosts)
    if server and not hosts:
        raise InvalidArgument("A server certificate needs at least one --host (name or IP)")
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usage.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    where = out or directory
    cert_path, key_path = where / f"{name}.crt", where / f"{name}.key"
    _write_private(key_path, _key_bytes(key))
    where.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert=cert_path, key=key_path)
