"""Password logins for IMAP, POP3 and SMTP submission through one cred Portal."""

from __future__ import annotations

from typing import Callable

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, DeferredSemaphore
from zope.interface import implementer

from mailstack.addresses import BadAddress, canonical
from mailstack.auth.users import Users


@implementer(ICredentialsChecker)
class PasswordChecker:
    """Checks a user name (an address, any case) and password against the users file.

    argon2 verification is slow on purpose, so it runs in the thread pool;
    an unknown user costs the same as a wrong password (SECURITY-TESTS AUTH-6).
    Each verification also takes argon2's memory (64 MiB by default) for a
    moment, so at most ``max_concurrent`` run at once: a flood of logins
    waits in line instead of taking a gigabyte.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: Users, run_blocking: Callable[..., Deferred],
                 max_concurrent: int = 4):
        self.users = users
        self._run = run_blocking
        self._slots = DeferredSemaphore(max_concurrent)

    def requestAvatarId(self, credentials) -> Deferred:
        password = credentials.password
        try:
            name = credentials.username
            if isinstance(name, bytes):
                name = name.decode("utf-8")
            if isinstance(password, bytes):
                password = password.decode("utf-8")
            address = canonical(name)
        except (UnicodeDecodeError, BadAddress):
            # Still spend the time of a verification, so the reply time
            # does not tell a malformed name from a wrong password.
            address, password = "", password if isinstance(password, str) else ""
        d = self._slots.run(self._run, self.users.check_password, address, password)
        d.addCallback(self._result, address)
        return d

    @staticmethod
    def _result(ok: bool, address: str) -> str:
        if not ok or not address:
            raise UnauthorizedLogin("Authentication failed")
        return address
