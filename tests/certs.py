"""Test certificates made with the `cryptography` package: a CA, server and client certificates, as PEM."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Issued = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def issue(cn: str, ca: Issued | None, *, server: bool = False) -> Issued:
    """A self-signed CA when `ca` is None, else a certificate signed by it (for `localhost` and 127.0.0.1
    when `server`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(ca[0].subject if ca else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return b.sign(ca[1] if ca else key, hashes.SHA256()), key


def pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    """(certificate PEM, unencrypted PKCS#8 key PEM)."""
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@dataclass
class Pki:
    """A CA with a server certificate written to `folder` (ca.pem, server.pem, server.key)."""

    folder: Path
    ca: Issued

    @classmethod
    def create(cls, folder: Path) -> Pki:
        ca = issue("test-ca", None)
        cert, key = pem(*issue("localhost", ca, server=True))
        (folder / "ca.pem").write_bytes(pem(*ca)[0])
        (folder / "server.pem").write_bytes(cert)
        (folder / "server.key").write_bytes(key)
        return cls(folder, ca)

    @property
    def ca_pem(self) -> bytes:
        return pem(*self.ca)[0]

    def client(self, cn: str) -> tuple[bytes, bytes]:
        return pem(*issue(cn, self.ca))
