"""TLS for every listener: the server context, and a self-signed first certificate.

The certificate file may hold a full chain (certbot's ``fullchain.pem``): the
first certificate is the server's, the rest are sent as the chain. TLS 1.2 is
the minimum (RFC 8996) and TLS 1.2 suites are limited to forward-secret AEAD
ones (RFC 9325); TLS 1.3 suites are OpenSSL's defaults. ``ServerContext``
reads the files again on SIGHUP (see service.py).

ALPN (the ALPACA cross-protocol attacks, SECURITY-TESTS TLSV-5): a client
that offers ALPN must offer the protocol of the port it reached (``smtp``,
``imap``, ``pop3``; each session class names its own in ``ALPN``), or the
handshake fails with the no_application_protocol alert. A browser sent to
port 993 offers ``http/1.1`` and gets nowhere; mail clients mostly offer no
ALPN at all, and that is accepted, as in Dovecot and Postfix.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL.SSL import NO_OVERLAPPING_PROTOCOLS, Connection, Error
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from mailstack.config import OutboundConfig, TLSConfig

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.S)
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class TLSSetupError(Exception):
    """The certificate or key cannot be used; the text says which and why."""


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerContext:
    """The server TLS settings of every listener, reloadable from the files.

    Listeners and STARTTLS hold this one object; each new handshake asks it
    for a connection, so after ``reload`` new handshakes use the new
    certificate while sessions already in TLS keep theirs (SIGHUP, e.g. from
    certbot's deploy hook). A certificate or key that cannot be used is
    reported and the previous one stays.
    """

    def __init__(self, tls: TLSConfig):
        self._tls = tls
        self._options = _load(tls)

    def reload(self) -> None:
        """Read the certificate and key again; TLSSetupError leaves the old ones."""
        self._options = _load(self._tls)

    def getContext(self):
        return self._options.getContext()

    def serverConnectionForTLS(self, protocol):
        return self._options.serverConnectionForTLS(protocol)


def server_context(tls: TLSConfig) -> ServerContext | None:
    """The context for TLS listeners and STARTTLS, or None when TLS is not configured."""
    if tls.certificate is None or tls.private_key is None:
        return None
    return ServerContext(tls)


def _load(tls: TLSConfig) -> ssl.CertificateOptions:
    """CertificateOptions from the files named by the config, checked."""
    try:
        chain = _PEM_CERT.findall(tls.certificate.read_bytes())
        key = tls.private_key.read_bytes()
    except OSError as e:
        raise TLSSetupError(f"{e.filename}: {e.strerror}") from None
    if not chain:
        raise TLSSetupError(f"{tls.certificate}: no PEM certificate found")
    try:
        server = ssl.PrivateCertificate.loadPEM(chain[0] + key)
        extra = [ssl.Certificate.loadPEM(c).original for c in chain[1:]]
    except Exception as e:  # pyOpenSSL raises its own error types
        raise TLSSetupError(f"{tls.certificate} / {tls.private_key}: {e}") from None
    options = ssl.CertificateOptions(
        privateKey=server.privateKey.original,
        certificate=server.original,
        extraCertChain=extra,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
    )
    try:
        context = options.getContext()  # checks that the key belongs to the certificate
    except Exception as e:
        raise TLSSetupError(f"{tls.certificate} / {tls.private_key}: {e}") from None
    context.set_alpn_select_callback(_select_alpn)
    return options


class NoApplicationProtocol(Error):
    """The client offered ALPN protocols, none of them this port's.

    Raised from the ALPN callback, it makes OpenSSL answer with the
    no_application_protocol alert (RFC 7301 3.2), and as an ``OpenSSL.SSL.Error``
    Twisted's TLS transport takes it as a failed handshake and closes.
    """


def _select_alpn(connection: Connection, offered: list[bytes]):
    """The session's own ALPN name if the client offered it."""
    session = connection.get_app_data().wrappedProtocol
    name = getattr(session, "ALPN", None)
    if name is None:
        return NO_OVERLAPPING_PROTOCOLS
    if name not in offered:
        # The (library, function, reason) list of an OpenSSL error queue,
        # the shape Twisted reads from an Error.
        raise NoApplicationProtocol([("mailstack", "ALPN", f"no application protocol: offered "
                                                           f"{offered!r}, this port speaks {name!r}")])
    return name


def client_context(outbound: OutboundConfig):
    """TLS for outbound SMTP.

    To MX hosts TLS is opportunistic and unauthenticated, as RFC 7435 and
    Postfix's ``may`` level do: an unverified certificate still beats
    plaintext, and refusing it would bounce mail. To a smarthost, which gets
    our password, the certificate must match its name unless the config says
    otherwise.
    """
    if outbound.relay and outbound.relay_verify_certificate:
        host = outbound.relay.rpartition(":")[0].strip("[]")
        return ssl.optionsForClientTLS(host)
    return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


def make_self_signed(hostname: str, certificate: Path, private_key: Path,
                     days: int = 825) -> None:
    """Write a self-signed RSA-2048 certificate for ``hostname`` (first runs, tests)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    for path in (certificate, private_key):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    Path(certificate).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
