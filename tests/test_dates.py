"""The header date is cached per second, so it must still follow the clock."""

from __future__ import annotations

import email.utils
import time

from twisted.trial import unittest

from mailstack.dates import header_date


class HeaderDateTests(unittest.TestCase):
    def test_is_now_in_rfc5322_form(self):
        before = int(time.time())
        stamp = email.utils.parsedate_to_datetime(header_date())
        self.assertIsNotNone(stamp.tzinfo)
        self.assertTrue(before <= stamp.timestamp() <= time.time())

    def test_moves_on_with_the_next_second(self):
        first = header_date()
        boundary = int(time.time()) + 1
        while time.time() < boundary:  # at most one second
            time.sleep(0.01)
        later = email.utils.parsedate_to_datetime(header_date()).timestamp()
        self.assertNotEqual(header_date(), first)
        self.assertTrue(boundary <= later <= time.time())
