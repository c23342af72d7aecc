"""`mailstack queue ...` and `mailstack dkim keygen`, run as the real command."""

import os
import stat
import subprocess
import sys

import dkim
from twisted.internet import defer

from mailstack.queue.dkimsign import load_keys, sign
from tests.support.instance import in_thread, wait_for
from tests.support.sink import Sink
from tests.test_outbound import OutboundTestCase


def mailstack(config, *args):
    return subprocess.run([sys.executable, "-m", "mailstack.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60)


class QueueCommandTests(OutboundTestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.start_dns()
        probe = Sink()
        self.port = probe.start()
        yield probe.stop()  # nothing listens there until a test says so
        self.start_sender(self.port, {"fwd@example.test": ["bob@remote.test"]},
                          queue={"first_retry": 3600.0, "max_retry_interval": 3600.0})
        yield self.send(self.sender, "demo@example.test", ["fwd@example.test"],
                        b"Subject: queued\r\n\r\nbody\r\n")
        envelopes = yield wait_for(lambda: [e for e in self.queued(self.sender)
                                            if e["recipients"][0]["attempts"] >= 1])
        self.queue_id = envelopes[0]["id"]

    @defer.inlineCallbacks
    def test_list_and_show_explain_why_a_message_waits(self):
        listing = yield in_thread(mailstack, self.sender.config_path, "queue", "list")
        self.assertEqual(listing.returncode, 0, listing.stderr)
        self.assertIn(self.queue_id, listing.stdout)
        self.assertIn("<demo@example.test>", listing.stdout)
        self.assertIn("<bob@remote.test> (attempts=1)", listing.stdout)
        self.assertIn("connect to mx.remote.test[127.0.0.1]", listing.stdout)
        shown = yield in_thread(mailstack, self.sender.config_path, "queue", "show", self.queue_id)
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertIn("Subject: queued", shown.stdout)
        self.assertIn("Recipient: <bob@remote.test> (for <fwd@example.test>) queued", shown.stdout)

    @defer.inlineCallbacks
    def test_flush_delivers_now_instead_of_in_an_hour(self):
        sink = self.start_sink(port=self.port)
        flushed = yield in_thread(mailstack, self.sender.config_path, "queue", "flush")
        self.assertEqual(flushed.returncode, 0, flushed.stderr)
        yield wait_for(lambda: sink.state.messages, timeout=10)
        yield wait_for(lambda: not self.queued(self.sender))

    @defer.inlineCallbacks
    def test_remove_drops_the_message_for_good(self):
        removed = yield in_thread(mailstack, self.sender.config_path, "queue", "remove",
                                  self.queue_id)
        self.assertEqual(removed.returncode, 0, removed.stderr)
        self.assertEqual(self.queued(self.sender), [])
        sink = self.start_sink(port=self.port)
        yield in_thread(mailstack, self.sender.config_path, "queue", "flush")
        yield wait_for(lambda: not (self.sender.config.server.spool_dir / "flush").exists())
        self.assertEqual(sink.state.messages, [])
        again = yield in_thread(mailstack, self.sender.config_path, "queue", "remove",
                                self.queue_id)
        self.assertEqual(again.returncode, 1)
        self.assertIn("no such message", again.stderr)


class KeygenTests(OutboundTestCase):
    def setUp(self):
        self.start_dns()
        self.start_sender(2, {})

    def keygen(self, *args):
        return mailstack(self.sender.config_path, "dkim", "keygen", "example.test", *args)

    def test_keys_are_private_and_the_record_verifies_a_signature(self):
        records = {}
        for algorithm, selector in (("rsa", "s2048"), ("ed25519", "sed")):
            result = self.keygen("--selector", selector, "--algorithm", algorithm)
            self.assertEqual(result.returncode, 0, result.stderr)
            line = result.stdout.strip().splitlines()[-1]
            name, _, _, rtype, value = line.split(" ", 4)
            self.assertEqual((name, rtype), (f"{selector}._domainkey.example.test.", "TXT"))
            records[name.encode()] = "".join(value.strip('"').split('" "')).encode()
        keys = load_keys(self.sender.config.dkim.keys_dir, "example.test")
        self.assertEqual([k.algorithm for k in keys], ["rsa", "ed25519"])
        for key in keys:
            self.assertEqual(stat.S_IMODE(os.stat(key.path).st_mode), 0o600)
        message = b"From: demo@example.test\nTo: x@remote.test\nSubject: s\n\nbody\n"
        signed = (b"".join(sign(message, keys)) + message).replace(b"\n", b"\r\n")
        verifier = dkim.DKIM(signed)
        for index in range(2):
            self.assertTrue(verifier.verify(idx=index, dnsfunc=lambda n, timeout=5: records.get(n)))
        self.assertIn(b"k=rsa", records[b"s2048._domainkey.example.test."])

    def test_an_existing_key_is_never_overwritten(self):
        self.assertEqual(self.keygen("--selector", "one").returncode, 0)
        again = self.keygen("--selector", "one")
        self.assertEqual(again.returncode, 1)
        self.assertIn("exists", again.stderr)

    def test_a_foreign_domain_is_refused(self):
        result = mailstack(self.sender.config_path, "dkim", "keygen", "elsewhere.test")
        self.assertEqual(result.returncode, 1)
        self.assertIn("not in server.domains", result.stderr)
