"""A throwaway certificate chain for signing provenance: a root CA and an ES256 signer.

Why: C2PA validates the signer's chain (an end-entity certificate with digitalSignature and EKU
emailProtection, issued by a CA; a bare self-signed certificate is rejected), and a researcher
trying `provenance.cert=` needs one before their organisation issues a real one. Tests use the
same chain. Valid for 30 days, labelled "sora_lightning test signer": never for publishing.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Chain:
    """PEM files of one signing identity."""

    cert: Path
    """End-entity certificate, then the root."""
    key: Path
    root: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sora_lightning test signer"),
        ]
    )


def _usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def make_chain(
    folder: Path,
    name: str = "signer",
    eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.EMAIL_PROTECTION,
) -> Chain:
    """A root CA and an ES256 end-entity certificate it issued, written as PEM under `folder`
    (`<name>-chain.pem`, `<name>-key.pem`, `<name>-root.pem`); existing files are refused."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = [
        p for p in (folder / f"{name}-{s}.pem" for s in ("chain", "key", "root")) if p.exists()
    ]
    if taken:
        raise FileExistsError(f"{taken[0]} exists: choose another folder or --name")
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (
        _builder(_name(f"{name} root"), _name(f"{name} root"), root_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(sign=False, ca=True), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        _builder(_name(name), root.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(sign=True, ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    chain = Chain(
        folder / f"{name}-chain.pem", folder / f"{name}-key.pem", folder / f"{name}-root.pem"
    )
    chain.cert.write_bytes(leaf.public_bytes(pem) + root.public_bytes(pem))
    chain.key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    chain.root.write_bytes(root.public_bytes(pem))
    return chain
