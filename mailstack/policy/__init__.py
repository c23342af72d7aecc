"""Inbound mail policy: SPF, DKIM, ARC, DMARC, greylisting, DNSBL, rate limits, lists.

``interface`` defines what a checker is (``IChecker``, ``Verdict``); ``chain``
builds the configured checkers and runs them for each SMTP session.
"""
