"""Fixtures for the set-up tests: an instance with every listener, a certificate for
all its web names, and the DNS fixture loaded from a zone file."""

from __future__ import annotations

import datetime
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import dns.rdatatype
import dns.zone
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor

from mailstack.config import load
from mailstack.queue.dkimsign import generate_key
from mailstack.service import MailstackService
from tests.support.instance import DOMAIN, HOSTNAME, Instance, write_instance

#: Every listener protocol, and the public port mail programs are told about.
PUBLIC_PORTS = {"smtp": 25, "submission": 587, "submissions": 465, "imap": 143, "imaps": 993,
                "pop3": 110, "pop3s": 995, "https": 443, "http": 80}
WEB_NAMES = (HOSTNAME, f"mta-sts.{DOMAIN}", f"autoconfig.{DOMAIN}", f"autodiscover.{DOMAIN}")
_CERT: dict[int, tuple[bytes, bytes]] = {}
_DKIM: dict[str, bytes] = {}


def certificate(days: int = 90) -> tuple[bytes, bytes]:
    """A self-signed certificate naming the host and its web names (the test's trust anchor)."""
    if days not in _CERT:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName(n) for n in WEB_NAMES]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        _CERT[days] = (cert.public_bytes(serialization.Encoding.PEM),
                       key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return _CERT[days]


def dkim_keys() -> dict[str, bytes]:
    """Two signing keys (rsa s1, ed25519 s2), made once per test run."""
    if not _DKIM:
        folder = Path(tempfile.mkdtemp())
        generate_key(folder, DOMAIN, "s1", "rsa")
        generate_key(folder, DOMAIN, "s2", "ed25519")
        for path in (folder / DOMAIN).iterdir():
            _DKIM[path.name] = path.read_bytes()
        shutil.rmtree(folder)
    return _DKIM


class SetupInstance(Instance):
    """An instance on loopback with every listener, advertising the standard ports."""

    def __init__(self, root: Path, dns_config: dict, listen=tuple(PUBLIC_PORTS),
                 sections: dict | None = None, server: dict | None = None, dkim: bool = True,
                 **layout):
        self.root = Path(root).resolve()
        clients = {f"{p}_port": PUBLIC_PORTS[p] for p in listen if p != "smtp"}
        all_sections = {"dns": dns_config, "clients": clients, "auth": {"failure_delay": 0.0},
                        **(sections or {})}
        self.config_path = write_instance(
            self.root, listen=[(p, 0) for p in listen], sections=all_sections,
            server={"public_ipv4": "127.0.0.1", **(server or {})}, **layout)
        cert, key = certificate()
        (self.root / "cert.pem").write_bytes(cert)
        (self.root / "key.pem").write_bytes(key)
        self.config = load(self.config_path)
        if dkim:
            folder = self.config.dkim.keys_dir / DOMAIN
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in dkim_keys().items():
                (folder / name).write_bytes(data)
                (folder / name).chmod(0o600)
        self.service = MailstackService(self.config, reactor)

    @property
    def cafile(self) -> Path:
        return self.root / "cert.pem"

    def port_map(self) -> str:
        return ",".join(f"{PUBLIC_PORTS[s.protocol]}={self.port(s.protocol)}"
                        for s in self.config.listen)


def mailstack(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real ``mailstack`` command."""
    return subprocess.run([sys.executable, "-m", "mailstack.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout)


def zone_records(text: str, origin: str) -> dict:
    """A zone file (dnspython parses it) as the DNS fixture's records dict."""
    zone = dns.zone.from_text(text, origin=origin + ".", relativize=False, check_origin=False)
    records: dict = {}
    for name, rdataset in zone.iterate_rdatasets():
        key = name.to_text(omit_final_dot=True).lower()
        rtype = dns.rdatatype.to_text(rdataset.rdtype)
        values = records.setdefault(key, {}).setdefault(rtype, [])
        for rdata in rdataset:
            if rtype == "MX":
                values.append((rdata.preference, rdata.exchange.to_text(omit_final_dot=True)))
            elif rtype == "TXT":
                values.append([s.decode() for s in rdata.strings])
            elif rtype == "SRV":
                target = rdata.target.to_text(omit_final_dot=True)
                values.append((rdata.priority, rdata.weight, rdata.port, target))
            elif rtype in ("CNAME", "PTR"):
                values.append(rdata.target.to_text(omit_final_dot=True))
            else:
                values.append(rdata.to_text())
    return records
