"""The one cred realm: a login yields the avatar the protocol asks for.

Each protocol registers how to build its avatar (a POP3 maildrop, later an
IMAP account or a submission identity) for an authenticated address; the
realm itself knows nothing about the protocols.
"""

from __future__ import annotations

from typing import Callable

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

#: address -> (avatar, logout) or a Deferred of it.
AvatarFactory = Callable[[str], object]


@implementer(IRealm)
class MailRealm:
    def __init__(self, factories: dict[type, AvatarFactory]):
        self._factories = factories

    def requestAvatar(self, avatarId: str, mind, *interfaces) -> Deferred:
        for interface in interfaces:
            factory = self._factories.get(interface)
            if factory is not None:
                d = maybeDeferred(factory, avatarId)
                d.addCallback(lambda result, i=interface: (i, *result))
                return d
        raise NotImplementedError(f"no avatar for {interfaces}")
