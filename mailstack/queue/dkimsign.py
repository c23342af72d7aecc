"""DKIM signing of the mail users submit (RFC 6376; ed25519-sha256, RFC 8463).

Keys live under ``[dkim] keys_dir`` as ``<domain>/<selector>.rsa.pem`` (RSA,
2048 bits by default, rsa-sha256) and ``<domain>/<selector>.ed25519.key``
(the base64 seed dkimpy expects). A domain with several keys gets one
signature per key, RSA first, so receivers that do not know ed25519 still
find a signature they can check. Signatures are relaxed/relaxed, and From
and Subject are over-signed (listed once more than they occur), so a header
added in transit breaks the signature instead of being shown to the reader
(SECURITY-TESTS DKIM-2).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

SIGNED_HEADERS = [b"from", b"from", b"subject", b"subject", b"to", b"cc", b"date",
                  b"message-id", b"reply-to", b"in-reply-to", b"references", b"mime-version",
                  b"content-type", b"content-transfer-encoding"]
ALGORITHMS = {"rsa": (".rsa.pem", b"rsa-sha256"), "ed25519": (".ed25519.key", b"ed25519-sha256")}


@dataclass(frozen=True)
class Key:
    domain: str
    selector: str
    algorithm: str
    private: bytes
    path: Path


class KeyExists(Exception):
    """keygen refuses to overwrite a key that may already be published."""


def load_keys(keys_dir: Path, domain: str) -> list[Key]:
    """The signing keys of ``domain``, RSA first."""
    folder = Path(keys_dir) / domain
    keys = []
    for algorithm, (suffix, _) in ALGORITHMS.items():
        for path in sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []:
            selector = path.name[: -len(suffix)]
            keys.append(Key(domain, selector, algorithm, path.read_bytes(), path))
    return keys


def sign(message: bytes, keys: list[Key]) -> list[bytes]:
    """DKIM-Signature header lines (LF line ends) for ``message``, one per key."""
    crlf = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    headers = []
    for key in keys:
        header = dkim.sign(crlf, key.selector.encode(), key.domain.encode(), key.private,
                           canonicalize=(b"relaxed", b"relaxed"),
                           signature_algorithm=ALGORITHMS[key.algorithm][1],
                           include_headers=SIGNED_HEADERS, linesep=b"\n")
        headers.append(header)
    return headers


def generate_key(keys_dir: Path, domain: str, selector: str, algorithm: str) -> tuple[Path, str]:
    """Write a new private key (mode 0600); returns its path and the DNS TXT value."""
    suffix = ALGORITHMS[algorithm][0]
    path = Path(keys_dir) / domain / f"{selector}{suffix}"
    if path.exists():
        raise KeyExists(f"{path} exists; choose another selector to rotate keys")
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        private = base64.b64encode(seed) + b"\n"
        public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    txt = f"v=DKIM1; k={algorithm}; p={base64.b64encode(public).decode('ascii')}"
    return path, txt


def txt_record_name(domain: str, selector: str) -> str:
    return f"{selector}._domainkey.{domain}"
