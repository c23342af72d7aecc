"""Noticing changes to a folder while a session waits (IMAP IDLE, RFC 2177).

With inotify (Linux), ``new/`` and ``cur/`` of a watched folder are watched
and any entry created, moved or deleted there (a delivery by SMTP in this or
another process, a flag change, an expunge) refreshes the folder's index a
few milliseconds later, which tells its listeners. Without inotify the
watched folders are polled every ``poll_interval`` seconds. Only folders
that some session is idling on are watched, and each only once.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from mailstack.store.index import FolderIndex

log = Logger(namespace="mailstack.store")
_DEBOUNCE = 0.02


class FolderWatcher:
    def __init__(self, clock, poll_interval: float = 1.0, use_inotify: bool = True):
        self.clock = clock
        self.poll_interval = poll_interval
        self._watched: dict[int, list] = {}  # id(index) -> [index, refcount, paths, pending]
        self._notifier = None
        self._use_inotify = use_inotify
        self._poller: task.LoopingCall | None = None

    def _start_inotify(self) -> None:
        """Open the inotify descriptor on first use (no reader while nobody idles)."""
        self._use_inotify = False
        try:
            from twisted.internet import inotify
            self._inotify = inotify
            self._notifier = inotify.INotify(self.clock)
            self._notifier.startReading()
        except Exception as e:  # no inotify on this platform, or out of instances
            log.info("inotify not available ({err}); polling every {s}s", err=e,
                     s=self.poll_interval)
            self._notifier = None

    def watch(self, index: FolderIndex) -> None:
        if self._use_inotify:
            self._start_inotify()
        key = id(index)
        item = self._watched.get(key)
        if item is not None:
            item[1] += 1
            return
        item = self._watched[key] = [index, 1, [], None]
        if self._notifier is not None:
            mask = (self._inotify.IN_CREATE | self._inotify.IN_MOVED_TO
                    | self._inotify.IN_MOVED_FROM | self._inotify.IN_DELETE
                    | self._inotify.IN_DONT_FOLLOW | self._inotify.IN_ONLYDIR)
            for sub in ("new", "cur"):
                path = FilePath(str(index.folder.path)).child(sub)
                try:
                    self._notifier.watch(path, mask, callbacks=[
                        lambda _w, _p, _m, key=key: self._changed(key)])
                    item[2].append(path)
                except Exception as e:
                    log.warn("cannot watch {path}: {err}", path=path.path, err=e)
        if self._notifier is None and self._poller is None:
            self._poller = task.LoopingCall(self._poll)
            self._poller.clock = self.clock
            self._poller.start(self.poll_interval, now=False)

    def unwatch(self, index: FolderIndex) -> None:
        key = id(index)
        item = self._watched.get(key)
        if item is None:
            return
        item[1] -= 1
        if item[1] > 0:
            return
        del self._watched[key]
        for path in item[2]:
            try:
                self._notifier.ignore(path)
            except (KeyError, Exception):
                pass
        if item[3] is not None and item[3].active():
            item[3].cancel()
        if not self._watched and self._poller is not None:
            self._poller.stop()
            self._poller = None

    def _changed(self, key: int) -> None:
        item = self._watched.get(key)
        if item is None or (item[3] is not None and item[3].active()):
            return
        item[3] = self.clock.callLater(_DEBOUNCE, self._refresh, key)

    def _refresh(self, key: int) -> None:
        item = self._watched.get(key)
        if item is not None:
            try:
                item[0].refresh()
            except Exception:
                log.failure("refreshing a watched folder")

    def _poll(self) -> None:
        for key in list(self._watched):
            self._refresh(key)

    def stop(self) -> None:
        for key in list(self._watched):
            item = self._watched.pop(key)
            if item[3] is not None and item[3].active():
                item[3].cancel()
        if self._poller is not None:
            self._poller.stop()
            self._poller = None
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
