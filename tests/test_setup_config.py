"""The set-up keys ([server] public addresses, [records], [clients], [http]) in the samples."""

from __future__ import annotations

from pathlib import Path

from twisted.trial import unittest

from mailstack import config
from mailstack.config import Listener, load

ETC = Path(__file__).resolve().parent.parent / "etc"


class SampleTests(unittest.SynchronousTestCase):
    def test_the_production_sample_documents_every_key_with_its_default(self):
        loaded = load(ETC / "mailstack.toml")
        self.assertEqual(loaded.records, config.RecordsConfig())
        self.assertEqual(loaded.clients, config.ClientsConfig())
        self.assertEqual(loaded.http, config.HTTPConfig())
        self.assertEqual((loaded.server.public_ipv4, loaded.server.public_ipv6), ("", ""))
        text = (ETC / "mailstack.toml").read_text()
        for cls, section in ((config.RecordsConfig, "records"), (config.ClientsConfig, "clients"),
                             (config.HTTPConfig, "http")):
            block = text.split(f"\n[{section}]\n", 1)[1].split("\n[", 1)[0]
            for f in cls.__dataclass_fields__:
                self.assertRegex(block, rf"(?m)^{f} = ", f"[{section}] {f} is not in the sample")
        for key in ("public_ipv4", "public_ipv6"):
            self.assertRegex(text, rf"(?m)^{key} = ")
        self.assertIn('# protocol = "https"', text)

    def test_make_run_serves_http_on_2080(self):
        self.assertIn(Listener("http", "127.0.0.1", 2080), load(ETC / "mailstack.dev.toml").listen)
