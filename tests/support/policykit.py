"""Helpers for the policy tests: DKIM/ARC keys made at test time, signing,
the policy environment over the real DNS fixture, and the data vectors of
``tests/data/policy/<group>/<NN-name>/`` (STYLE 8).

A vector folder holds ``case.json`` and ``message.eml`` (LF line ends; sent
with CRLF). ``case.json`` keys, all optional but ``expect``:

* ``client`` (default 127.0.0.2), ``helo``, ``from`` (MAIL FROM; "" is the
  null sender), ``to`` (list of RCPT TO);
* ``zone``: DNS records for the fixture (tests/support/dnsserver.py format),
  ``hang`` and ``servfail``: names the fixture never answers / fails;
* ``keys``: ``{"name": {"domain", "selector", "algorithm": "rsa"|"ed25519",
  "bits", "publish": "yes"|"revoked"|"no", "key_tags": "t=y"}}``: generated
  for the test, their TXT records (with ``key_tags`` after ``v=DKIM1``) added
  to the zone;
* ``sign``: key names to sign the message with, in order (each signature is
  added on top); ``sign_options``: extra dkim.sign arguments (``length``,
  ``signature_algorithm``, ``canonicalize``, ``include_headers``) and
  ``tags``, signature tags to set or add (``{"x": "1000003600"}``), signed
  as they are;
* ``arc``: key names to ARC-seal with, in order (one set each);
* ``after_signing``: ``{"append_body": text, "prepend_headers": text,
  "replace": [old, new]}``: changes made after signing;
* ``policy``: ``[policy]`` settings for the instance;
* ``expect``: ``{"mail", "rcpt", "data"}``: ``"250"`` or ``"CODE X.Y.Z"`` of
  the first refusal; ``folder``: ``"INBOX"``, ``".Junk"`` or null;
  ``authentication_results``: the result clauses after the authserv-id.
"""

from __future__ import annotations

import base64
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import reactor, threads

from mailstack.config import DNSConfig
from mailstack.dns import Resolver
from mailstack.policy.interface import Environment

DATA = Path(__file__).resolve().parent.parent / "data" / "policy"
AUTHSERV_ID = "mail.example.test"


# -- keys --------------------------------------------------------------------
def _probable_prime(n: int, rounds: int = 24) -> bool:
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29):
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(rounds):
        x = pow(random.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _weak_rsa(bits: int):
    """An RSA key below cryptography's 1024-bit floor (for DKIM-4 tests only)."""
    def prime(b):
        while True:
            c = random.getrandbits(b) | (1 << b - 1) | (1 << b - 2) | 1
            if _probable_prime(c) and math.gcd(c - 1, 65537) == 1:
                return c
    while True:
        p, q = prime(bits // 2), prime(bits // 2)
        if p != q:
            break
    d = pow(65537, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                    rsa.RSAPublicNumbers(65537, p * q))
    return numbers.private_key(unsafe_skip_rsa_key_validation=True)


@dataclass(frozen=True)
class Key:
    domain: str
    selector: str
    algorithm: str
    #: What dkimpy signs with: PEM (RSA) or the base64 seed (ed25519).
    private: bytes
    #: The TXT value of ``<selector>._domainkey.<domain>``.
    txt: str

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def zone(self, publish: str = "yes", key_tags: str = "") -> dict:
        if publish == "no":
            return {}
        txt = self.txt if publish == "yes" else f"v=DKIM1; k={self.algorithm}; p="
        if key_tags:
            txt = txt.replace("v=DKIM1; ", f"v=DKIM1; {key_tags}; ", 1)
        return {self.record_name: {"TXT": [split_txt(txt)]}}


def split_txt(value: str) -> list[str]:
    """A TXT value as strings of at most 255 octets (RFC 1035 3.3.14)."""
    return [value[i:i + 255] for i in range(0, len(value), 255)] or [""]


def make_key(domain: str, selector: str, algorithm: str = "rsa", bits: int = 2048) -> Key:
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
        return Key(domain, selector, algorithm, base64.b64encode(seed),
                   f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}")
    key = rsa.generate_private_key(65537, bits) if bits >= 1024 else _weak_rsa(bits)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return Key(domain, selector, algorithm, private,
               f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}")


class _Tagged(dkim.DKIM):
    """A signer that sets signature tags dkimpy has no argument for (x=, a
    foreign i=), before the signature is computed over them."""

    def __init__(self, message: bytes, tags: dict[bytes, bytes]):
        super().__init__(message)
        self.tags = tags

    def gen_header(self, fields, *args, **kwargs):
        fields = [(k, self.tags.get(k, v)) for k, v in fields]
        known = {k for k, _ in fields}
        at = next(i for i, (k, _) in enumerate(fields) if k == b"bh")
        fields[at:at] = [(k, v) for k, v in self.tags.items() if k not in known]
        return super().gen_header(fields, *args, **kwargs)


def sign(message: bytes, key: Key, tags: dict | None = None, **options) -> bytes:
    """``message`` (CRLF) with one more DKIM-Signature on top."""
    algorithm = b"ed25519-sha256" if key.algorithm == "ed25519" else b"rsa-sha256"
    options["signature_algorithm"] = _bytes(options.get("signature_algorithm", algorithm))
    options["canonicalize"] = tuple(_bytes(c) for c in options.get(
        "canonicalize", (b"relaxed", b"relaxed")))
    options["include_headers"] = [_bytes(h) for h in options.get(
        "include_headers", [b"from", b"to", b"subject", b"date"])]
    signer = _Tagged(message, {_bytes(k): _bytes(v) for k, v in (tags or {}).items()})
    header = signer.sign(key.selector.encode(), key.domain.encode(), key.private, **options)
    return header + message


def _bytes(value) -> bytes:
    return value.encode() if isinstance(value, str) else value


def arc_seal(message: bytes, key: Key, authserv_id: str) -> bytes:
    """``message`` with one more ARC set on top (it must carry an A-R for
    ``authserv_id``). dkimpy only seals with rsa-sha256."""
    headers = dkim.arc_sign(message, key.selector.encode(), key.domain.encode(), key.private,
                            authserv_id.encode(), include_headers=[b"from", b"to", b"subject"])
    return b"".join(headers) + message


def crlf(text: bytes) -> bytes:
    return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# -- the environment ---------------------------------------------------------
def resolver_for(dns_port: int, timeout: float = 0.5) -> Resolver:
    config = DNSConfig(nameservers=("127.0.0.1",), port=dns_port, timeout=timeout)
    return Resolver(config, threads.deferToThread)


def environment(resolver: Resolver, state_dir: Path, clock=reactor) -> Environment:
    return Environment(resolver=resolver, clock=clock, run_blocking=threads.deferToThread,
                       hostname=AUTHSERV_ID, authserv_id=AUTHSERV_ID,
                       state_dir=Path(state_dir), local_domains=("example.test",))


# -- vectors -----------------------------------------------------------------
@dataclass
class Vector:
    name: str
    case: dict
    message: bytes
    keys: dict

    @property
    def expect(self) -> dict:
        return self.case["expect"]

    @property
    def client(self) -> str:
        return self.case.get("client", "127.0.0.2")

    @property
    def sender(self) -> str:
        return self.case.get("from", "sender@example.org")

    @property
    def helo(self) -> str:
        return self.case.get("helo", "mail." + (self.sender.rpartition("@")[2] or "example.org"))

    @property
    def recipients(self) -> list[str]:
        return self.case.get("to", ["demo@example.test"])

    def zone(self) -> dict:
        zone = dict(self.case.get("zone", {}))
        for name, spec in self.case.get("keys", {}).items():
            zone.update(self.keys[name].zone(spec.get("publish", "yes"), spec.get("key_tags", "")))
        return zone


def vector_names(group: str) -> list[str]:
    return sorted(p.name for p in (DATA / group).iterdir() if (p / "case.json").exists())


_KEY_CACHE: dict[tuple, Key] = {}


def load_vector(group: str, name: str) -> Vector:
    folder = DATA / group / name
    case = json.loads((folder / "case.json").read_text())
    keys = {}
    for key_name, spec in case.get("keys", {}).items():
        cache_key = (spec["domain"], spec["selector"], spec.get("algorithm", "rsa"),
                     spec.get("bits", 2048))
        if cache_key not in _KEY_CACHE:
            _KEY_CACHE[cache_key] = make_key(*cache_key)
        keys[key_name] = _KEY_CACHE[cache_key]
    message = crlf((folder / "message.eml").read_bytes())
    options = {k: v for k, v in case.get("sign_options", {}).items()}
    for key_name in case.get("sign", []):
        message = sign(message, keys[key_name], **options)
    for key_name in case.get("arc", []):
        message = arc_seal(message, keys[key_name], case.get("arc_authserv_id", "relay.test"))
    after = case.get("after_signing", {})
    if "prepend_headers" in after:
        message = crlf(after["prepend_headers"].encode()) + message
    if "replace" in after:
        old, new = after["replace"]
        message = message.replace(old.encode(), new.encode(), 1)
    if "append_body" in after:
        message += crlf(after["append_body"].encode())
    return Vector(name, case, message, keys)


def unfold(lines: list[str]) -> str:
    """A header field given as lines (as stored) unfolded into one."""
    return "".join(lines).replace("\t", " ")


def result_clauses(header_value: str) -> list[str]:
    """The result clauses of an Authentication-Results value, after the
    authserv-id, with folding white space collapsed."""
    parts = [" ".join(p.split()) for p in header_value.split(";")]
    return parts[1:]


def start_dns(fixture) -> int:
    """``fixture.start()`` that retries when the TCP port twin of the UDP port
    is taken (DNSFixture.start leaks its UDP port then; tests run in parallel
    on shared machines, so it happens)."""
    from twisted.internet.error import CannotListenError
    for _ in range(50):
        udp = reactor.listenUDP(0, fixture.datagram_protocol(), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, fixture.factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            continue
        fixture.port = port
        fixture._ports = [udp, tcp]
        return port
    raise RuntimeError("no free UDP+TCP port pair for the DNS fixture")
