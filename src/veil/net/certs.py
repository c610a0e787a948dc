"""Certificates for mutual TLS between parties: one private CA per deployment, one key per party.

Security properties:

* ``generate_certificates`` makes a fresh certificate authority (EC P-256 key from the OS RNG via
  ``cryptography``) and, for each party, an EC P-256 key and a certificate signed by that CA whose
  subject CN and only subjectAltName (DNSName) are the party name (with ``extra_names``, a server
  that clients dial by address, e.g. ``veil fl server``, also gets its host names and IP addresses:
  Veil's MPC channels refuse such a certificate, they accept exactly the party name). The CA is the *only* trust anchor
  the TLS transport loads, so a party is authenticated as ``NAME`` exactly when it proves possession
  of a key certified by this CA for ``NAME``.
* ``ca.key`` can mint identities: keep it off the compute hosts (each host needs ``ca.pem``,
  ``NAME.pem`` and ``NAME.key`` only). Private keys are written unencrypted with mode 0600; their
  protection is the file system's.
* Every file is written atomically (temporary file in the same directory, then ``os.replace``), so
  a crash never leaves a half-written key or certificate behind. Existing files are replaced.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import stat
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veil.files import write_atomic

_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
_CLOCK_SKEW = datetime.timedelta(minutes=5)


def validate_party_names(parties: Sequence[str]) -> tuple[str, ...]:
    """Return ``parties`` as a tuple; ValueError unless they are distinct, non-empty [A-Za-z0-9_-]."""
    if isinstance(parties, str):
        raise ValueError(f"parties must be a sequence of names, not the string {parties!r}")
    names = tuple(parties)
    if not names:
        raise ValueError("at least one party name is needed")
    bad = [p for p in names if not isinstance(p, str) or not _NAME_RE.fullmatch(p)]
    if bad:
        raise ValueError(f"invalid party name(s) {bad!r}: use 1 to 64 characters from A-Z a-z 0-9 _ -")
    dupes = sorted({p for p in names if names.count(p) > 1})
    if dupes:
        raise ValueError(f"party names must be distinct; repeated: {dupes}")
    if "ca" in names:
        raise ValueError("'ca' is reserved for the certificate authority's files; rename that party")
    return names


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def subject_alt_name(text: str) -> x509.GeneralName:
    """``10.0.0.5`` or ``::1`` -> an IP address entry; ``fl.example.org`` -> a DNS name entry."""
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?",
                        text):
        raise ValueError(f"{text!r} is neither an IP address nor a host name")
    return x509.DNSName(text)


def generate_certificates(parties: Sequence[str], out_dir: Path, *, days: int = 365,
                          extra_names: Mapping[str, Sequence[str]] | None = None) -> None:
    """Write a fresh CA (``ca.pem``, ``ca.key``) and ``NAME.pem``/``NAME.key`` for every party.

    Certificates are valid from five minutes ago (clock skew between hosts) for ``days`` days.
    ``extra_names`` adds host names and IP addresses to a party's subjectAltName (a server that
    clients dial by address, e.g. ``veil fl server``); Veil's own MPC channels check the party name.
    """
    names = validate_party_names(parties)
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    extra = {k: [subject_alt_name(v) for v in vs] for k, vs in (extra_names or {}).items()}
    unknown = sorted(set(extra) - set(names))
    if unknown:
        raise ValueError(f"extra names for {', '.join(unknown)}, which are not among the parties")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - _CLOCK_SKEW, now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("veil CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    pem = serialization.Encoding.PEM
    files: list[tuple[Path, bytes, int]] = [(out_dir / CA_CERT, ca_cert.public_bytes(pem), 0o644),
                                            (out_dir / CA_KEY, _key_pem(ca_key), 0o600)]
    for party in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(_name(party)).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(party), *extra.get(party, [])]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(aki, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        files += [(out_dir / f"{party}.pem", cert.public_bytes(pem), 0o644),
                  (out_dir / f"{party}.key", _key_pem(key), 0o600)]
    for path, data, mode in files:
        write_atomic(path, data, mode)


@dataclass(frozen=True)
class Credentials:
    """Where one party's TLS material lies: the CA certificate, its certificate and its key."""

    party: str
    ca: Path
    cert: Path
    key: Path


def load_credentials(certs_dir: Path, party: str) -> Credentials:
    """Locate ``ca.pem``, ``PARTY.pem`` and ``PARTY.key`` in ``certs_dir``.

    FileNotFoundError names the missing file; a key readable by group or others draws a warning.
    """
    (party,) = validate_party_names([party])
    certs_dir = Path(certs_dir)
    creds = Credentials(party, certs_dir / CA_CERT, certs_dir / f"{party}.pem", certs_dir / f"{party}.key")
    for path in (creds.ca, creds.cert, creds.key):
        if not path.is_file():
            raise FileNotFoundError(f"party {party!r}: missing {path}; run `veil keygen --parties ... "
                                    f"--out {certs_dir}` and copy ca.pem, {party}.pem and {party}.key "
                                    f"to this host")
    if creds.key.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.warn(f"private key {creds.key} is accessible by group or others; chmod 600 it",
                      stacklevel=2)
    return creds
