"""The DATA fast path (``DataReader.feed_buffered``) is the line path, only faster.

Every test runs the same stream, cut into the same chunks, through the line
path (``LineSplitter.next_line`` + ``DataReader.feed``, one Line at a time)
and through the session's loop (``feed_buffered`` first, then the line path),
and asserts the same stored bytes, the same outcome, at the same chunk, with
the same bytes left over for the command parser. The smuggling vectors are
SECURITY-TESTS section 1 (SMUG-1..11).
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailstack.smtp import reply
from mailstack.smtp.framing import MAX_BLOCK, DataReader, LineSplitter

from tests.support.instance import wait_for
from tests.support.smtpclient import MXInstance
from tests.test_framing import FAKE_ENDS, SMUGGLED


class Run:
    """One DATA section read from ``chunks`` as ``Session._process`` reads it."""

    def __init__(self, chunks: list[bytes], max_size: int, limit: int, bulk: bool,
                 block_sink: bool):
        #: The message bytes, LF line ends, as MessageWriter would hold them.
        self.stored: list[bytes] = []
        self.lines: list[bytes] = []
        self.blocks = 0

        def write_line(text: bytes) -> None:
            self.lines.append(text)
            self.stored.append(text + b"\n")

        def write_block(data: bytes) -> None:
            assert data.endswith(b"\n") and len(data) <= MAX_BLOCK
            self.stored.append(data)

        self.reader = DataReader(max_size, write_line, write_block if block_sink else None)
        self.splitter = splitter = LineSplitter(limit)
        #: After each chunk: bytes stored so far, done, error.
        self.steps: list[tuple] = []
        self.rest = b""
        for i, chunk in enumerate(chunks):
            splitter.feed(chunk)
            while not self.reader.done:
                if bulk and self.reader.feed_buffered(splitter):
                    self.blocks += 1
                    continue
                line = splitter.next_line()
                if line is None:
                    break
                self.reader.feed(line)
            self.steps.append((len(b"".join(self.stored)), self.reader.done, self.reader.error))
            if self.reader.done:
                # What the command parser reads next, in the state it reads it.
                self.rest = splitter._buffer[splitter._pos:] + b"".join(chunks[i + 1:])
                break

    def outcome(self) -> tuple:
        s = self.splitter
        return (b"".join(self.stored), self.steps, self.rest, self.reader.done,
                self.reader.error, self.reader.size, s._buffer[s._pos:], s._after_crlf,
                s._discarding, s._dropped_cr)


def compare(test: unittest.SynchronousTestCase, chunks: list[bytes], max_size: int = 10_000,
            limit: int = 1000) -> Run:
    """Assert that both paths agree, for both kinds of sink; return the bulk run."""
    line = Run(chunks, max_size, limit, bulk=False, block_sink=False)
    for block_sink in (False, True):
        bulk = Run(chunks, max_size, limit, bulk=True, block_sink=block_sink)
        test.assertEqual(bulk.outcome(), line.outcome(), block_sink)
        if not block_sink:
            # Line callbacks (submission, policy buffer) see the very same calls.
            test.assertEqual(bulk.lines, line.lines)
    return bulk


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(edges, edges[1:])] or [b""]


_SEGMENTS = st.one_of(
    # Ordinary lines, with dots to unstuff, around the small limits used.
    st.text(alphabet="ab. :", max_size=40).map(lambda s: s.encode() + b"\r\n"),
    st.integers(min_value=0, max_value=80).map(lambda k: b"x" * k + b"\r\n"),
    st.integers(min_value=0, max_value=80).map(lambda k: b"." * k + b"\r\n"),
    # Ends, fake ends, bare CR and LF, incomplete pieces, pipelined commands.
    st.sampled_from([b".\r\n", b"..\r\n", b"\r\n", b"\n", b"\r", b"\r\r\n", b".", b"x",
                     b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r\r\n.\r\r\n",
                     b"\r\n.\r\n", b".\r\nQUIT\r\n", b"MAIL FROM:<a@b>\r\n", b"\x00\xff\r\n"]),
)


class BulkIsLinePathTests(unittest.SynchronousTestCase):
    @settings(max_examples=1500, deadline=None)
    @given(st.lists(_SEGMENTS, max_size=40).map(b"".join),
           st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
           st.integers(min_value=3, max_value=60),
           st.one_of(st.integers(min_value=0, max_value=600), st.just(1 << 20)))
    def test_any_stream_any_chunking(self, stream, points, limit, max_size):
        compare(self, cut(stream, points), max_size, limit)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.text(alphabet="ab. \t:", max_size=30).map(str.encode), max_size=30),
           st.lists(st.integers(min_value=0, max_value=2000), max_size=8))
    def test_conforming_messages_take_the_fast_path(self, lines, points):
        stream = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)
        run = compare(self, cut(stream + b".\r\nQUIT\r\n", points))
        self.assertTrue(run.reader.done)
        self.assertIsNone(run.reader.error)
        self.assertEqual(b"".join(run.stored), b"".join(x + b"\n" for x in lines))
        self.assertEqual(run.rest, b"QUIT\r\n")

    def test_whole_message_in_one_chunk_is_one_block(self):
        body = b"Subject: x\r\n\r\n" + b"".join(b"..line %d\r\n" % i for i in range(200))
        run = compare(self, [body + b".\r\nQUIT\r\n"])
        self.assertEqual(run.blocks, 1)
        self.assertEqual(b"".join(run.stored),
                         body.replace(b"\r\n..", b"\r\n.").replace(b"\r\n", b"\n"))
        self.assertEqual(run.rest, b"QUIT\r\n")

    def test_large_chunks_are_taken_in_bounded_blocks(self):
        body = b"".join(b"%08d abcdefghijklmnopqrstuvwxyz\r\n" % i for i in range(40_000))
        run = compare(self, [body + b".\r\n"], max_size=len(body))
        self.assertIsNone(run.reader.error)
        self.assertGreater(run.blocks, len(body) // MAX_BLOCK)

    def test_size_limit_exact_boundary(self):
        body = b"12345678\r\n" * 10
        for extra in (b"", b"x\r\n"):
            for max_size in (99, 100, 101, 102, 103):
                run = compare(self, [body + extra + b".\r\n"], max_size=max_size)
                expected = None if max_size >= len(body + extra) else reply.MESSAGE_TOO_BIG
                self.assertEqual(run.reader.error, expected, (extra, max_size))

    def test_line_limit_exact_boundary(self):
        # RFC 5321 4.5.3.1.6: 1000 octets including CRLF.
        for n, error in ((998, None), (999, reply.TEXT_LINE_TOO_LONG)):
            stream = b"a\r\n" + b"y" * n + b"\r\nb\r\n.\r\n"
            for chunks in ([stream], cut(stream, [500]), cut(stream, [1001, 1002])):
                run = compare(self, chunks)
                self.assertEqual(run.reader.error, error, n)


class SmugglingThroughTheFastPathTests(unittest.SynchronousTestCase):
    """SECURITY-TESTS SMUG-1..11 with ordinary lines around them, in one chunk
    (the fast path takes the lines before the vector) and cut everywhere."""

    HEAD = b"From: a@remote.test\r\nSubject: x\r\n\r\nfirst\r\n..stuffed\r\n"

    def check(self, stream: bytes, error, rest: bytes = b"QUIT\r\n", max_size: int = 10_000):
        whole = compare(self, [stream], max_size=max_size)
        self.assertTrue(whole.reader.done)
        self.assertEqual(whole.reader.error, error)
        self.assertEqual(whole.rest, rest)
        # A bad byte anywhere in what is buffered sends all of it down the line
        # path; cut after the ordinary lines, the fast path takes those.
        blocks = 0
        for i in [len(self.HEAD), *range(0, len(stream) + 1, max(1, len(stream) // 97))]:
            run = compare(self, [stream[:i], stream[i:]], max_size=max_size)
            self.assertEqual((run.reader.error, run.rest), (error, rest), i)
            blocks += run.blocks
        self.assertGreater(blocks, 0)

    def test_smug_1_to_5_fake_ends(self):
        for fake_end in FAKE_ENDS.values():
            self.check(self.HEAD + b"hello" + fake_end + SMUGGLED + b"more\r\n.\r\nQUIT\r\n",
                       reply.BARE_NEWLINE_DATA)

    def test_smug_6_bare_newline_inside_a_line(self):
        for bad in (b"hello\nworld\r\n", b"hello\rworld\r\n", b"hello\r\r\n"):
            self.check(self.HEAD + bad + b"tail\r\n.\r\nQUIT\r\n", reply.BARE_NEWLINE_DATA)

    def test_smug_8_oversized_with_injected_commands(self):
        body = b"".join(b"line %04d\r\n" % i for i in range(200))
        stream = (self.HEAD + body + b"\r\n.\r\n" + SMUGGLED + b"..\r\n" + body
                  + b".\r\nQUIT\r\n")
        # The "\r\n.\r\n" inside is a real end: what follows it is commands.
        run = compare(self, [stream], max_size=1000)
        self.assertEqual(run.reader.error, reply.MESSAGE_TOO_BIG)
        self.assertTrue(run.rest.startswith(b"MAIL FROM:<ceo@local.test>"))
        stream = self.HEAD + body + b"\n.\n" + SMUGGLED + b"..\r\n" + body + b".\r\nQUIT\r\n"
        self.check(stream, reply.MESSAGE_TOO_BIG, max_size=1000)

    def test_smug_9_dot_stuffing_and_empty_message(self):
        run = compare(self, [b".\r\nQUIT\r\n"])
        self.assertEqual((run.reader.done, run.reader.error, run.stored, run.rest),
                         (True, None, [], b"QUIT\r\n"))
        stream = b"..leading\r\n...\r\n..\r\n.x\r\nmid.dle.\r\n.\r\nQUIT\r\n"
        self.check(stream, None)
        self.assertEqual(b"".join(compare(self, [stream]).stored),
                         b".leading\n..\n.\nx\nmid.dle.\n")

    def test_smug_11_overlong_line_then_commands(self):
        stream = self.HEAD + b"A" * 20_000 + b"\r\n" + SMUGGLED + b".\r\nQUIT\r\n"
        self.check(stream, reply.TEXT_LINE_TOO_LONG)
        for fake_end in (b"\n.\r\n", b"\n.\n", b"\r.\r\n"):
            stream = self.HEAD + b"A" * 3000 + fake_end + SMUGGLED + b".\r\nQUIT\r\n"
            self.check(stream, reply.TEXT_LINE_TOO_LONG)


def normal(data: bytes) -> bytes:
    """Without what differs between two runs: queue IDs, client addresses, dates."""
    data = re.sub(rb"\b[0-9A-F]{12,}\b", b"ID", data)
    data = re.sub(rb"(10|127)\.0\.\d+\.\d+", b"IP", data)
    return re.sub(rb"\w{3}, \d+ \w{3} \d{4} [\d:]{8} [-+]\d{4}", b"DATE", data)


class SessionTests(unittest.TestCase):
    """The whole inbound session in-process: the same stream, cut the same way,
    gives the same replies after each chunk and the same stored message with
    the fast path as with the line path alone."""

    GOOD = (b"From: a@remote.test\r\nSubject: x\r\n\r\n..leading\r\n" + b"body line\r\n" * 300
            + b".\r\nQUIT\r\n")
    STREAMS = [
        GOOD,
        b".\r\nQUIT\r\n",
        *(SmugglingThroughTheFastPathTests.HEAD + b"hello" + end
          + SMUGGLED.replace(b"local.test", b"example.test") + b".\r\nQUIT\r\n"
          for end in FAKE_ENDS.values()),
        SmugglingThroughTheFastPathTests.HEAD + b"z" * 20_000 + b"\r\n"
        + SMUGGLED.replace(b"local.test", b"example.test") + b".\r\nQUIT\r\n",
        # SMUG-8: over the size limit, with a fake end and commands inside.
        b"".join(b"line %05d\r\n" % i for i in range(6000)) + b"\n.\n" + SMUGGLED
        + b"x\r\n" * 100 + b".\r\nQUIT\r\n",
        b"a\r\n" * 30 + b"\r\n.\r\nNOOP\r\nMAIL FROM:<b@remote.test>\r\nRCPT TO:<demo@example.test>"
        b"\r\nDATA\r\n",
    ]

    @defer.inlineCallbacks
    def dialogue(self, instance: MXInstance, chunks: list[bytes], net: str):
        # A new address each time: no connection-rate limit applies.
        self.peers = getattr(self, "peers", 0) + 1
        peer = IPv4Address("TCP", f"{net}.{self.peers // 200}.{self.peers % 200 + 1}", 40000)
        session = instance.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        self.addCleanup(session.setTimeout, None)
        session.makeConnection(transport)
        session.dataReceived(b"EHLO client.test\r\nMAIL FROM:<s@remote.test>\r\n"
                             b"RCPT TO:<demo@example.test>\r\nDATA\r\n")
        yield wait_for(lambda: b"354 " in transport.value())
        replies = []
        for chunk in chunks:
            session.dataReceived(chunk)
            yield wait_for(lambda: not session._busy)
            replies.append(normal(transport.value()))
        session.connectionLost(None)
        transport.disconnected = True
        stored = [normal(m) for m in instance.committed_messages.values()]
        return replies, stored

    @defer.inlineCallbacks
    def test_same_replies_and_stored_bytes(self):
        instance = MXInstance(self, smtp={"max_message_size": 65536})
        taken, outcomes = [], set()
        feed_buffered = DataReader.feed_buffered

        def counting(reader, splitter):
            took = feed_buffered(reader, splitter)
            taken.append(took)
            return took

        for stream in self.STREAMS:
            for points in ([], [len(stream) // 2], [7, 300, 301, 2000, 4500, 20050, 65530, 65540]):
                # 127/8 is trusted (the spool writer's write_block); 10/8 goes
                # through the policy checks (MessageBuffer.write_line).
                for net in ("127.0", "10.0"):
                    chunks = cut(stream, points)
                    self.patch(DataReader, "feed_buffered", lambda reader, splitter: False)
                    instance.committed_messages.clear()
                    expected = yield self.dialogue(instance, chunks, net)
                    self.patch(DataReader, "feed_buffered", counting)
                    instance.committed_messages.clear()
                    got = yield self.dialogue(instance, chunks, net)
                    self.assertEqual(got, expected, (stream[:80], points, net))
                    outcomes.add((net, b"Received-SPF" in b"".join(got[1]), len(got[1])))
        self.assertGreater(taken.count(True), len(self.STREAMS))
        # Both paths were really taken, and some messages stored in each.
        self.assertEqual({o[:2] for o in outcomes if o[2]}, {("127.0", False), ("10.0", True)})

    @defer.inlineCallbacks
    def test_idle_timer_restarts_per_chunk_that_ends_a_line(self):
        """LIM-2: bytes that end no line do not keep a session alive; a chunk
        of many DATA lines restarts the timer once (RFC 5321 4.5.3.2.7)."""
        instance = MXInstance(self, smtp={"idle_timeout": 10})
        clock = Clock()
        peer = IPv4Address("TCP", "127.0.0.9", 40000)
        session = instance.factory.buildProtocol(peer)
        session.callLater = clock.callLater
        transport = StringTransport(peerAddress=peer)
        self.addCleanup(session.setTimeout, None)
        session.makeConnection(transport)
        session.dataReceived(b"EHLO client.test\r\nMAIL FROM:<s@remote.test>\r\n"
                             b"RCPT TO:<demo@example.test>\r\nDATA\r\n")
        yield wait_for(lambda: b"354 " in transport.value())
        for _ in range(5):
            clock.advance(9)
            session.dataReceived(b"line\r\n" * 50)
        for _ in range(9):
            clock.advance(1)
            session.dataReceived(b"no end ")
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(transport.value().rsplit(b"\r\n", 2)[-2].startswith(b"421 "))
        session.connectionLost(None)
        transport.disconnected = True

    @defer.inlineCallbacks
    def test_input_while_a_commit_is_pending(self):
        """The next commands sent before the 250 wait, unread past a bound,
        and are answered in order once the message is queued."""
        instance = MXInstance(self)
        peer = IPv4Address("TCP", "127.0.0.10", 40000)
        session = instance.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        self.addCleanup(session.setTimeout, None)
        session.makeConnection(transport)
        session.dataReceived(b"EHLO client.test\r\nMAIL FROM:<s@remote.test>\r\n"
                             b"RCPT TO:<demo@example.test>\r\nDATA\r\n")
        yield wait_for(lambda: b"354 " in transport.value())
        session.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\nRSET\r\n")
        self.assertTrue(session._busy, "the commit runs off the reactor thread")
        self.assertEqual(transport.producerState, "producing", "a little input is just kept")
        # A real transport stops calling dataReceived once paused.
        noops = 0
        while transport.producerState == "producing" and noops < 2 * MAX_BLOCK:
            session.dataReceived(b"NOOP\r\n")
            noops += 1
        self.assertEqual(transport.producerState, "paused")
        self.assertLessEqual(session.splitter.buffered(), MAX_BLOCK + len(b"NOOP\r\n"))
        self.assertNotIn(b"250 2.0.0 Ok: queued", transport.value())
        yield wait_for(lambda: not session._busy)
        self.assertEqual(transport.producerState, "producing")
        replies = transport.value().split(b"354 ", 1)[1].split(b"\r\n")[1:-1]
        self.assertTrue(replies[0].startswith(b"250 2.0.0 Ok: queued as "), replies[0])
        self.assertEqual(replies[1:], [b"250 2.0.0 Ok"] * (noops + 1))
        session.connectionLost(None)
        transport.disconnected = True
