"""SMTP framing on byte strings (STYLE.md 2): LineSplitter and DataReader.

No sockets: bytes go in, Lines and the DATA outcome come out. The smuggling
vectors are SECURITY-TESTS section 1 (SMUG-1..11).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mailstack.smtp import reply
from mailstack.smtp.framing import DataReader, Line, LineSplitter

SMUGGLED = (b"MAIL FROM:<ceo@local.test>\r\nRCPT TO:<u@local.test>\r\nDATA\r\n"
            b"From: ceo@local.test\r\n\r\nwire money\r\n")
#: The fake ends of data of SECURITY-TESTS SMUG-1..5.
FAKE_ENDS = {
    "SMUG-1": b"\n.\n",
    "SMUG-2": b"\n.\r\n",
    "SMUG-3": b"\r\n.\n",
    "SMUG-4a": b"\r.\r",
    "SMUG-4b": b"\r\n.\r",
    "SMUG-5": b"\r\r\n.\r\r\n",
}


def lines_of(splitter: LineSplitter) -> list[Line]:
    out = []
    while (line := splitter.next_line()) is not None:
        out.append(line)
    return out


def split_all(data: bytes, limit: int = 1000, chunk: int | None = None) -> list[Line]:
    splitter = LineSplitter(limit)
    out = []
    step = chunk or max(len(data), 1)
    for i in range(0, len(data), step):
        splitter.feed(data[i:i + step])
        out += lines_of(splitter)
    return out


class Data:
    """One DATA section read from a stream, as the session does it."""

    def __init__(self, stream: bytes, max_size: int = 10_000, limit: int = 1000,
                 chunk: int | None = None):
        self.written: list[bytes] = []
        self.reader = DataReader(max_size, self.written.append)
        self.splitter = LineSplitter(limit)
        self.lines_after: list[Line] = []
        step = chunk or max(len(stream), 1)
        for i in range(0, len(stream), step):
            self.splitter.feed(stream[i:i + step])
            while (line := self.splitter.next_line()) is not None:
                if self.reader.done:
                    self.lines_after.append(line)
                else:
                    self.reader.feed(line)

    @property
    def error(self):
        return self.reader.error


class LineSplitterTests(unittest.SynchronousTestCase):
    def test_crlf_lines(self):
        self.assertEqual(split_all(b"EHLO a\r\nMAIL FROM:<>\r\n\r\n"),
                         [Line(b"EHLO a"), Line(b"MAIL FROM:<>"), Line(b"")])

    def test_incomplete_line_waits(self):
        splitter = LineSplitter(100)
        splitter.feed(b"EHLO a\r\nNO")
        self.assertEqual(lines_of(splitter), [Line(b"EHLO a")])
        self.assertTrue(splitter.pending())
        splitter.feed(b"OP\r")
        self.assertIsNone(splitter.next_line())
        splitter.feed(b"\n")
        self.assertEqual(lines_of(splitter), [Line(b"NOOP")])
        self.assertFalse(splitter.pending())

    def test_bare_lf_and_bare_cr_are_flagged(self):
        self.assertEqual(split_all(b"one\ntwo\rthree\r\nfour\r\r\n\r\n"), [
            Line(b"one", crlf=False),
            Line(b"two\rthree", crlf=False, after_crlf=False),
            # CR CR LF is never collapsed into CRLF (SMUG-5).
            Line(b"four\r", crlf=False),
            Line(b""),
        ])

    def test_after_crlf_tells_what_ended_the_previous_line(self):
        self.assertEqual(split_all(b"a\n.\r\nb\r\n.\r\n\n\n"), [
            Line(b"a", crlf=False), Line(b".", after_crlf=False), Line(b"b"), Line(b"."),
            Line(b"", crlf=False), Line(b"", crlf=False, after_crlf=False)])
        # Also after an over-long line whose end was discarded, wherever the chunks split.
        for ending, after in ((b"\r\n", True), (b"\n", False)):
            data = b"x" * 50 + ending + b".\r\n"
            for i in range(len(data) + 1):
                splitter = LineSplitter(10)
                splitter.feed(data[:i])
                got = lines_of(splitter)
                splitter.feed(data[i:])
                got += lines_of(splitter)
                self.assertEqual(got, [Line(b"x" * 10, crlf=False, overlong=True),
                                       Line(b".", after_crlf=after)], (ending, i))

    def test_lone_cr_does_not_end_a_line(self):
        splitter = LineSplitter(100)
        splitter.feed(b"a\r.\r")
        self.assertIsNone(splitter.next_line())

    def test_limit_counts_the_crlf(self):
        # RFC 5321 4.5.3.1.4: 512 octets including CRLF.
        ok = b"x" * 510 + b"\r\n"
        self.assertEqual(split_all(ok, 512), [Line(b"x" * 510)])
        self.assertEqual(split_all(ok, 512, chunk=1), [Line(b"x" * 510)])
        long = b"x" * 511 + b"\r\nNOOP\r\n"
        for chunk in (None, 1, 7, 511, 512):
            lines = split_all(long, 512, chunk=chunk)
            self.assertEqual(lines, [Line(b"x" * 511 + b"\r", crlf=False, overlong=True),
                                     Line(b"NOOP")], chunk)

    def test_overlong_line_is_reported_once_and_skipped_to_the_next_lf(self):
        data = b"A" * 5000 + b"\r\nRSET\r\n"
        for chunk in (None, 1, 3, 99, 100, 101, 4096):
            self.assertEqual(split_all(data, 100, chunk=chunk),
                             [Line(b"A" * 100, crlf=False, overlong=True), Line(b"RSET")], chunk)

    def test_overlong_line_ending_in_bare_lf(self):
        self.assertEqual(split_all(b"B" * 300 + b"\nQUIT\r\n", 100, chunk=50),
                         [Line(b"B" * 100, crlf=False, overlong=True),
                          Line(b"QUIT", after_crlf=False)])

    def test_memory_is_bounded_when_a_line_never_ends(self):
        limit = 1000
        splitter = LineSplitter(limit)
        reported = []
        chunk = b"z" * 4096
        peak = 0
        for _ in range(10 * 1024 * 1024 // len(chunk)):
            splitter.feed(chunk)
            peak = max(peak, len(splitter._buffer))
            reported += lines_of(splitter)
            self.assertLessEqual(len(splitter._buffer), limit)
        self.assertLessEqual(peak, limit + len(chunk))
        self.assertEqual(reported, [Line(b"z" * limit, crlf=False, overlong=True)])
        splitter.feed(b"\r\nQUIT\r\n")
        self.assertEqual(lines_of(splitter), [Line(b"QUIT")])

    def test_memory_is_bounded_with_large_chunks(self):
        splitter = LineSplitter(512)
        for _ in range(10):
            splitter.feed(b"y" * 1_000_000)
            lines_of(splitter)
            self.assertLessEqual(len(splitter._buffer), 512)

    def test_clear_forgets_everything(self):
        # STARTTLS: nothing received before the handshake may count (TLS-1).
        splitter = LineSplitter(100)
        splitter.feed(b"STARTTLS\r\nRSET\r\nMAIL FR")
        self.assertEqual(splitter.next_line(), Line(b"STARTTLS"))
        splitter.clear()
        self.assertFalse(splitter.pending())
        self.assertIsNone(splitter.next_line())
        splitter.feed(b"EHLO b\r\n")
        self.assertEqual(lines_of(splitter), [Line(b"EHLO b")])

    def test_clear_ends_discarding(self):
        splitter = LineSplitter(10)
        splitter.feed(b"x" * 50)
        self.assertTrue(splitter.next_line().overlong)
        splitter.clear()
        splitter.feed(b"EHLO b\r\n")
        self.assertEqual(lines_of(splitter), [Line(b"EHLO b")])

    def test_set_limit(self):
        splitter = LineSplitter(512)
        splitter.set_limit(1000)
        splitter.feed(b"x" * 900 + b"\r\n")
        self.assertEqual(lines_of(splitter), [Line(b"x" * 900)])

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.sampled_from([b"a", b"bc", b".", b"\r", b"\n", b"\r\n", b"defgh" * 3]),
                    max_size=60).map(b"".join),
           st.integers(min_value=3, max_value=24),
           st.lists(st.integers(min_value=0, max_value=400), max_size=20))
    def test_any_chunking_gives_the_same_lines(self, data, limit, cuts):
        whole = LineSplitter(limit)
        whole.feed(data)
        expected = lines_of(whole)

        chunked = LineSplitter(limit)
        got = []
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        for start, end in zip(points, points[1:]):
            chunked.feed(data[start:end])
            got += lines_of(chunked)
        self.assertEqual(got, expected)
        for line in got:
            self.assertLessEqual(len(line.text), limit)
            self.assertNotIn(b"\n", line.text)

    def test_every_split_position(self):
        data = b"EHLO a\r\nbare\nx" + b"q" * 40 + b"\r\n.\r\nlast\r\r\n"
        expected = split_all(data, 20)
        for i in range(len(data) + 1):
            splitter = LineSplitter(20)
            splitter.feed(data[:i])
            got = lines_of(splitter)
            splitter.feed(data[i:])
            got += lines_of(splitter)
            self.assertEqual(got, expected, i)


class DataReaderTests(unittest.SynchronousTestCase):
    def test_plain_message(self):
        data = Data(b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        self.assertTrue(data.reader.done)
        self.assertIsNone(data.error)
        self.assertEqual(data.written, [b"Subject: hi", b"", b"body"])
        self.assertEqual(data.reader.size, len(b"Subject: hi\r\n\r\nbody\r\n"))
        self.assertEqual(data.lines_after, [Line(b"QUIT")])

    def test_dot_unstuffing(self):
        # RFC 5321 4.5.2: the first dot of a line is removed.
        data = Data(b"..leading\r\n...\r\n..\r\n.x\r\nmid.dle.\r\n.\r\n")
        self.assertIsNone(data.error)
        self.assertEqual(data.written, [b".leading", b"..", b".", b"x", b"mid.dle."])

    def test_empty_message(self):
        # SMUG-9: a final dot straight after 354.
        data = Data(b".\r\nNOOP\r\n")
        self.assertTrue(data.reader.done)
        self.assertIsNone(data.error)
        self.assertEqual(data.written, [])
        self.assertEqual(data.lines_after, [Line(b"NOOP")])

    def test_feed_reports_the_final_dot(self):
        reader = DataReader(100, lambda text: None)
        self.assertFalse(reader.feed(Line(b"a")))
        self.assertFalse(reader.feed(Line(b".", crlf=False)))
        self.assertFalse(reader.feed(Line(b".", after_crlf=False)))  # "\n.\r\n", SMUG-2
        self.assertFalse(reader.feed(Line(b".", crlf=False, overlong=True)))
        self.assertFalse(reader.feed(Line(b"..")))
        self.assertTrue(reader.feed(Line(b".")))
        self.assertTrue(reader.done)

    def test_smuggling_never_ends_data_early(self):
        for name, fake_end in FAKE_ENDS.items():
            stream = b"Subject: x\r\n\r\nhello" + fake_end + SMUGGLED + b".\r\nQUIT\r\n"
            for chunk in (None, 1, 5):
                data = Data(stream, chunk=chunk)
                self.assertTrue(data.reader.done, name)
                # The real end was the last dot: only QUIT is left, no smuggled MAIL.
                self.assertEqual(data.lines_after, [Line(b"QUIT")], name)
                self.assertEqual(data.error, reply.BARE_NEWLINE_DATA, name)
                self.assertEqual(data.error.code, 550)

    def test_smuggling_with_a_fake_end_right_after_354(self):
        for name, fake_end in FAKE_ENDS.items():
            fake = fake_end.lstrip(b"\r\n") if fake_end.startswith(b"\r\n") else fake_end
            data = Data(fake + SMUGGLED + b".\r\n")
            self.assertTrue(data.reader.done, name)
            self.assertEqual(data.lines_after, [], name)
            self.assertIsNotNone(data.error, name)

    def test_bare_newline_in_body_is_refused(self):
        # SMUG-6: an explicit policy, reject (as Postfix "reject" and chasquid do).
        for body in (b"hello\nworld\r\n", b"hello\rworld\r\n", b"hello\r\r\n"):
            data = Data(body + b".\r\n")
            self.assertTrue(data.reader.done)
            self.assertEqual(data.error, reply.BARE_NEWLINE_DATA, body)

    def test_nothing_is_written_after_an_error(self):
        data = Data(b"one\r\ntwo\nthree\r\nfour\r\n.\r\n")
        self.assertEqual(data.written, [b"one"])
        self.assertEqual(data.error, reply.BARE_NEWLINE_DATA)

    def test_size_limit_reads_to_the_final_dot(self):
        # SMUG-8: the oversized part holds fake ends and commands.
        body = b"".join(b"line %04d\r\n" % i for i in range(200))
        stream = body + b"\n.\nMAIL FROM:<ceo@local.test>\r\n" + body + b".\r\nRSET\r\n"
        data = Data(stream, max_size=1000, chunk=64)
        self.assertTrue(data.reader.done)
        self.assertEqual(data.error, reply.MESSAGE_TOO_BIG)
        self.assertEqual((data.error.code, data.error.enhanced), (552, "5.3.4"))
        self.assertEqual(data.lines_after, [Line(b"RSET")])
        self.assertLessEqual(sum(len(t) + 2 for t in data.written), 1000)

    def test_size_limit_is_exact(self):
        body = b"12345678\r\n" * 10  # 100 octets with CRLF
        self.assertIsNone(Data(body + b".\r\n", max_size=100).error)
        self.assertEqual(Data(body + b"x\r\n.\r\n", max_size=100).error, reply.MESSAGE_TOO_BIG)
        # Stuffed dots do not count.
        self.assertIsNone(Data(b"..\r\n" * 50 + b".\r\n", max_size=150).error)

    def test_overlong_line_never_returns_to_command_mode(self):
        # SMUG-11: one 20 000-octet line, then commands, then the real end.
        stream = b"Subject: x\r\n\r\n" + b"A" * 20_000 + b"\r\n" + SMUGGLED + b".\r\nQUIT\r\n"
        for chunk in (None, 512, 1000, 4096):
            data = Data(stream, chunk=chunk)
            self.assertTrue(data.reader.done)
            self.assertEqual(data.error, reply.TEXT_LINE_TOO_LONG)
            self.assertEqual(data.lines_after, [Line(b"QUIT")])

    def test_fake_end_after_an_overlong_line(self):
        for fake_end in (b"\n.\r\n", b"\n.\n", b"\r.\r\n"):
            stream = b"A" * 3000 + fake_end + SMUGGLED + b".\r\nQUIT\r\n"
            for chunk in (None, 1000, 3000, 3001):
                data = Data(stream, chunk=chunk)
                self.assertEqual(data.lines_after, [Line(b"QUIT")], (fake_end, chunk))
                self.assertEqual(data.error, reply.TEXT_LINE_TOO_LONG)

    def test_real_end_after_an_overlong_line(self):
        for chunk in (None, 1, 1000, 3000, 3001):
            data = Data(b"A" * 3000 + b"\r\n.\r\nQUIT\r\n", chunk=chunk)
            self.assertEqual(data.lines_after, [Line(b"QUIT")], chunk)
            self.assertEqual(data.error, reply.TEXT_LINE_TOO_LONG)

    def test_overlong_line_of_dots_is_not_an_end(self):
        data = Data(b"." * 3000 + b"\r\n.\r\n")
        self.assertTrue(data.reader.done)
        self.assertEqual(data.error, reply.TEXT_LINE_TOO_LONG)
        self.assertEqual(data.lines_after, [])

    def test_first_error_wins(self):
        data = Data(b"bad\nline\r\n" + b"x" * 2000 + b"\r\n.\r\n", max_size=65536)
        self.assertEqual(data.error, reply.BARE_NEWLINE_DATA)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.text(alphabet="ab. \t:", max_size=30).map(str.encode), max_size=20),
           st.integers(min_value=1, max_value=50))
    def test_stuffed_message_round_trips_under_any_chunking(self, lines, chunk):
        # What a conforming client sends (RFC 5321 4.5.2) comes back unchanged.
        stream = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                          for line in lines) + b".\r\n"
        data = Data(stream, chunk=chunk)
        self.assertTrue(data.reader.done)
        self.assertIsNone(data.error)
        self.assertEqual(data.written, lines)
