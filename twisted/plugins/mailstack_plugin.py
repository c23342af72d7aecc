"""``twistd mailstack --config FILE``: the mail server as a twistd plugin."""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [
        ["config", "c", "/etc/mailstack/mailstack.toml", "The mailstack TOML configuration file."],
    ]


@implementer(IServiceMaker, IPlugin)
class MailstackServiceMaker:
    tapname = "mailstack"
    description = "A complete mail server: SMTP, IMAP, POP3, queue, SPF/DKIM/DMARC."
    options = Options

    def makeService(self, options):
        import sys

        from mailstack.config import ConfigError, load
        from mailstack.logs import observer_for_twistd
        from mailstack.queue.spool import SpoolLocked
        from mailstack.service import MailstackService
        from mailstack.tls import TLSSetupError

        try:
            service = MailstackService(load(options["config"]))
        except (ConfigError, SpoolLocked, TLSSetupError, ValueError) as e:
            sys.exit(f"mailstack: {e}")
        service.log_observer = observer_for_twistd(options.parent, service.reactor)
        return service


serviceMaker = MailstackServiceMaker()
