"""The HTTP(S) listener: one twisted.web Site, one route table.

Routes (paths compare case-insensitively, as Outlook varies the case):

=====================================================  ======  =====================================
``/mail/config-v1.1.xml?emailaddress=``                GET     Thunderbird autoconfig
``/.well-known/autoconfig/mail/config-v1.1.xml``       GET     the same, on the domain's own host
``/autodiscover/autodiscover.xml``                     POST    Outlook autodiscover (POX)
``/autodiscover/autodiscover.json[/v1.0/ADDRESS]``     GET     Outlook's JSON step (AutodiscoverV1)
``/apple/mail.mobileconfig?emailaddress=``             GET     Apple configuration profile
``/.well-known/mta-sts.txt``                           GET     the MTA-STS policy (RFC 8461 3.3)
``/.well-known/acme-challenge/TOKEN``                  GET     certbot --webroot
``/metrics``                                           GET     Prometheus (metrics_networks only)
``/healthz``                                           GET     "ok" while the service runs
``/``                                                  GET     a page to download the Apple profile
=====================================================  ======  =====================================

Request bodies are capped (``MAX_BODY``) and held in memory; XML with a DTD
is refused. Blocking work (reading files, rendering metrics that list the
spool) runs in the service's thread pool.
"""

from __future__ import annotations

import io
import ipaddress
import json
import re
from html import escape
from typing import Callable
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import resource, server

from mailstack.addresses import BadAddress, canonical
from mailstack.config import Config
from mailstack.setup.records import mta_sts_policy
from mailstack.web import clients

log = Logger(namespace="mailstack.http")

#: Request bodies larger than this get 413 (autodiscover requests are < 1 KiB).
MAX_BODY = 64 * 1024
_TOKEN = re.compile(r"[A-Za-z0-9_\-]{1,256}\Z")


class Request(server.Request):
    """A request whose body is kept in memory up to MAX_BODY and dropped beyond."""

    too_large = False

    def gotLength(self, length):
        self.content = io.BytesIO()
        self.too_large = length is not None and length > MAX_BODY

    def handleContentChunk(self, data):
        if self.too_large or self.content.tell() + len(data) > MAX_BODY:
            self.too_large = True
            return
        self.content.write(data)


class Site(server.Site):
    requestFactory = Request
    noisy = False
    displayTracebacks = False

    def log(self, request):
        log.info('{ip} "{method} {path}" {code} {length}', ip=request.getClientAddress().host,
                 method=request.method.decode("ascii", "replace"),
                 path=request.uri.decode("ascii", "replace")[:200], code=request.code,
                 length=request.sentLength)


class Root(resource.Resource):
    isLeaf = True

    def __init__(self, config: Config, metrics, run_blocking: Callable[..., Deferred],
                 bound: Callable[[str], int] | None = None):
        super().__init__()
        self.config = config
        self.metrics = metrics
        self.run_blocking = run_blocking
        self.bound = bound
        self.networks = [ipaddress.ip_network(n, strict=False)
                         for n in config.http.metrics_networks]
        self.routes = {
            "/mail/config-v1.1.xml": ("autoconfig", self.autoconfig),
            "/.well-known/autoconfig/mail/config-v1.1.xml": ("autoconfig", self.autoconfig),
            "/autodiscover/autodiscover.xml": ("autodiscover", self.autodiscover),
            "/autodiscover/autodiscover.json": ("autodiscover-json", self.autodiscover_json),
            "/apple/mail.mobileconfig": ("mobileconfig", self.mobileconfig),
            "/.well-known/mta-sts.txt": ("mta-sts", self.mta_sts),
            "/metrics": ("metrics", self.prometheus),
            "/healthz": ("healthz", self.healthz),
            "/": ("index", self.index),
        }

    def settings(self) -> clients.Settings:
        return clients.Settings.from_config(self.config, self.bound)

    # -- dispatch ------------------------------------------------------------
    def render(self, request):
        path = unquote(request.path.decode("utf-8", "replace")).lower()
        name, handler = self._route(path)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.notifyFinish().addBoth(lambda _: self.metrics.http_request(name, request.code))
        if request.too_large:
            return self._reply(request, 413, "request body too large\n")
        if handler is None:
            return self._reply(request, 404, "not found\n")
        wanted = (b"POST",) if name == "autodiscover" else (b"GET", b"HEAD")
        if request.method not in wanted:
            request.setHeader(b"allow", b", ".join(wanted))
            return self._reply(request, 405, "method not allowed\n")
        return handler(request, path)

    def _route(self, path: str):
        if path in self.routes:
            return self.routes[path]
        if path.startswith("/autodiscover/autodiscover.json/"):
            return self.routes["/autodiscover/autodiscover.json"]
        if path.startswith("/.well-known/acme-challenge/") and self.config.http.acme_challenge_dir:
            return "acme", self.acme
        return "other", None

    @staticmethod
    def _reply(request, code: int, body: bytes | str,
               ctype: bytes = b"text/plain; charset=utf-8") -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", ctype)
        return body.encode("utf-8") if isinstance(body, str) else body

    @staticmethod
    def _arg(request, name: str) -> str:
        for key, values in request.args.items():
            if key.decode("ascii", "replace").lower() == name.lower() and values:
                return values[0].decode("utf-8", "replace").strip()
        return ""

    def _local(self, address: str) -> tuple[str, str]:
        """Canonical address and its domain, which must be local; raises BadAddress."""
        address = canonical(address)
        domain = address.rpartition("@")[2]
        if domain not in self.config.server.domains:
            raise BadAddress(f"{domain} is not served here")
        return address, domain

    def _request_domain(self, request) -> str | None:
        """The domain of ?emailaddress=, else of the Host header (autoconfig.<domain>)."""
        given = self._arg(request, "emailaddress")
        if given:
            try:
                return self._local(given)[1]
            except BadAddress:
                return None
        host = (request.getRequestHostname() or b"").decode("ascii", "replace").lower()
        for prefix in ("autoconfig.", "mta-sts.", "autodiscover.", ""):
            if host.startswith(prefix) and host[len(prefix):] in self.config.server.domains:
                return host[len(prefix):]
        if len(self.config.server.domains) == 1:
            return self.config.server.domains[0]
        return None

    # -- client set-up ---------------------------------------------------------
    def autoconfig(self, request, path):
        domain = self._request_domain(request)
        if domain is None:
            return self._reply(request, 404, "no such mail domain here\n")
        settings = self.settings()
        if not settings.incoming or not settings.outgoing:
            # Thunderbird refuses a document without both; nothing is better.
            return self._reply(request, 404, "no mail service with TLS is configured\n")
        request.setHeader(b"cache-control", b"max-age=3600")
        return self._reply(request, 200, clients.thunderbird(settings, domain),
                           b"application/xml")

    def autodiscover(self, request, path):
        def answer(body: bytes) -> bytes:
            return self._reply(request, 200, body, b"text/xml; charset=utf-8")

        try:
            address, schema = clients.parse_pox_request(request.content.getvalue())
        except clients.BadRequest as e:
            return answer(clients.outlook_pox_error(600, str(e)))
        if schema != clients.OUTLOOK_NS:
            return answer(clients.outlook_pox_error(601, "The requested schema is not available"))
        try:
            address, domain = self._local(address)
        except BadAddress:
            return answer(clients.outlook_pox_error(500, "The e-mail address cannot be found."))
        return answer(clients.outlook_pox(self.settings(), address, domain))

    def autodiscover_json(self, request, path):
        def answer(code: int, body: dict | bytes) -> bytes:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            return self._reply(request, code, data, b"application/json; charset=utf-8")

        protocol = self._arg(request, "Protocol")
        if protocol.lower() != "autodiscoverv1":
            return answer(400, {"ErrorCode": "InvalidProtocol", "ErrorMessage":
                                f"The given protocol value '{protocol[:40]}' is invalid. "
                                "Supported values are 'AutodiscoverV1'"})
        address = self._arg(request, "Email")
        if not address and "/v1.0/" in path:
            address = path.split("/v1.0/", 1)[1]
        try:
            self._local(address)
        except BadAddress:
            return answer(404, {"ErrorCode": "EmailNotFound",
                                "ErrorMessage": "No such mail address here"})
        return answer(200, clients.outlook_json(self.settings()))

    def mobileconfig(self, request, path):
        try:
            address, domain = self._local(self._arg(request, "emailaddress"))
            profile = clients.apple_profile(self.settings(), address, domain)
        except (BadAddress, clients.BadRequest) as e:
            return self._reply(request, 400, f"cannot make a profile: {e}\n")
        request.setHeader(b"content-disposition",
                          f'attachment; filename="{domain}.mobileconfig"'.encode())
        return self._reply(request, 200, profile, b"application/x-apple-aspen-config")

    def index(self, request, path):
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Mail set-up</title>"
                f"</head><body><h1>Mail on {escape(self.config.server.hostname)}</h1>"
                "<p>Thunderbird, Outlook and K-9 set themselves up from your address and "
                "password. On an iPhone, iPad or Mac, download a profile:</p>"
                "<form action='/apple/mail.mobileconfig'><input name='emailaddress' "
                "type='email' placeholder='you@example.com' required> "
                "<button>Download</button></form></body></html>")
        return self._reply(request, 200, page, b"text/html; charset=utf-8")

    # -- MTA-STS, ACME, metrics, health ---------------------------------------------
    def mta_sts(self, request, path):
        host = (request.getRequestHostname() or b"").decode("ascii", "replace").lower()
        if host.startswith("mta-sts.") and host[8:] not in self.config.server.domains:
            return self._reply(request, 404, "no MTA-STS policy for this domain\n")
        # RFC 8461 3.3: the policy is text/plain; senders cache it for max_age.
        return self._reply(request, 200, mta_sts_policy(self.config))

    def acme(self, request, path):
        token = request.path.decode("ascii", "replace").rsplit("/", 1)[1]
        if not _TOKEN.match(token):
            return self._reply(request, 404, "not found\n")
        file = self.config.http.acme_challenge_dir / ".well-known" / "acme-challenge" / token

        def read():
            try:
                return file.read_bytes()[:4096]
            except OSError:
                return None

        return self._later(request, self.run_blocking(read), lambda data: (
            self._reply(request, 200, data) if data is not None
            else self._reply(request, 404, "not found\n")))

    def prometheus(self, request, path):
        from prometheus_client import CONTENT_TYPE_LATEST

        client = ipaddress.ip_address(request.getClientAddress().host)
        if client.version == 6 and client.ipv4_mapped is not None:
            client = client.ipv4_mapped
        if not any(client in net for net in self.networks):
            return self._reply(request, 403, "forbidden\n")
        return self._later(request, self.run_blocking(self.metrics.render), lambda data: (
            self._reply(request, 200, data, CONTENT_TYPE_LATEST.encode())))

    def healthz(self, request, path):
        return self._reply(request, 200, "ok\n")

    def _later(self, request, d: Deferred, respond):
        """Answer when ``d`` fires (work in the pool); nothing if the client left."""
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def done(result):
            if not gone:
                request.write(respond(result))
                request.finish()

        def failed(failure):
            log.failure("{path}: cannot answer", failure, path=request.path)
            if not gone:
                request.write(self._reply(request, 500, "internal error\n"))
                request.finish()

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET


def build_site(config: Config, metrics, run_blocking, bound=None) -> Site:
    site = Site(Root(config, metrics, run_blocking, bound), timeout=60)
    return site
