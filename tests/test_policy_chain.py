"""The chain: verdict semantics, order, time budget, errors, trust, loading checkers."""

from __future__ import annotations

from pathlib import Path

from authres import SPFAuthenticationResult
from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailstack.config import ConfigError, from_dict
from mailstack.policy import interface
from mailstack.policy.chain import Chain, build_chain
from mailstack.policy.interface import Checker, IChecker, Verdict
from mailstack.policy.message import MessageBuffer


def immediate(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


def environment(clock=None, state_dir="."):
    return interface.Environment(resolver=None, clock=clock or task.Clock(),
                                 run_blocking=immediate, hostname="mx.example.test",
                                 authserv_id="mx.example.test", state_dir=Path(state_dir))


class Scripted(Checker):
    """Answers the verdicts it is given, per stage, and records its calls."""

    def __init__(self, name, calls, **verdicts):
        self.name = name
        self.calls = calls
        self.verdicts = verdicts
        self.stages = frozenset(verdicts)

    def _answer(self, stage):
        self.calls.append((self.name, stage))
        verdict = self.verdicts[stage]
        return verdict if isinstance(verdict, defer.Deferred) else defer.succeed(verdict)

    def connect(self, conn):
        return self._answer("connect")

    def helo(self, conn):
        return self._answer("helo")

    def mail_from(self, conn, txn):
        return self._answer("mail")

    def rcpt_to(self, conn, txn, recipient):
        return self._answer("rcpt")

    def end_of_data(self, conn, txn, message):
        return self._answer("data")


def buffer_of(message: bytes) -> MessageBuffer:
    buffer = MessageBuffer()
    for line in message.split(b"\r\n"):
        buffer.write_line(line)
    return buffer


class VerdictTests(unittest.TestCase):
    def chain(self, *checkers, clock=None, trusted=()):
        return Chain(list(checkers), environment(clock), trusted, stage_timeout=30)

    @defer.inlineCallbacks
    def test_continue_runs_every_checker_in_order(self):
        calls = []
        chain = self.chain(Scripted("a", calls, mail=interface.CONTINUE),
                           Scripted("b", calls, mail=interface.CONTINUE))
        policy = chain.session("192.0.2.1")
        self.assertIsNone((yield policy.mail("x@y.test")))
        self.assertEqual(calls, [("a", "mail"), ("b", "mail")])

    @defer.inlineCallbacks
    def test_accept_ends_the_stage(self):
        calls = []
        chain = self.chain(Scripted("a", calls, rcpt=interface.accept("known")),
                           Scripted("b", calls, rcpt=interface.reject("no")))
        policy = chain.session("192.0.2.1")
        yield policy.mail("x@y.test")
        self.assertIsNone((yield policy.rcpt("demo@example.test")))
        self.assertEqual(calls, [("a", "rcpt")])
        self.assertEqual(policy.txn.recipients, ["demo@example.test"])

    @defer.inlineCallbacks
    def test_defer_and_reject_answer_their_reply_and_stop(self):
        calls = []
        chain = self.chain(Scripted("a", calls, mail=interface.defer("later", "4.7.1")),
                           Scripted("b", calls, mail=interface.CONTINUE))
        reply = yield chain.session("192.0.2.1").mail("x@y.test")
        self.assertEqual((reply.code, reply.enhanced, reply.text), (451, "4.7.1", "later"))
        self.assertEqual(calls, [("a", "mail")])
        chain = self.chain(Scripted("a", calls, helo=interface.reject("go away", code=554)))
        reply = yield chain.session("192.0.2.1").helo("x.test")
        self.assertEqual((reply.code, reply.enhanced), (554, "5.7.1"))

    @defer.inlineCallbacks
    def test_a_refused_recipient_is_not_added(self):
        chain = self.chain(Scripted("a", [], rcpt=interface.defer("greylisted")))
        policy = chain.session("192.0.2.1")
        yield policy.mail("x@y.test")
        reply = yield policy.rcpt("demo@example.test")
        self.assertEqual(reply.code, 451)
        self.assertEqual(policy.txn.recipients, [])

    @defer.inlineCallbacks
    def test_quarantine_continues_and_selects_junk(self):
        calls = []
        clause = SPFAuthenticationResult(result="pass", smtp_mailfrom="y.test")
        chain = self.chain(
            Scripted("a", calls, mail=interface.proceed([clause], [("Received-SPF", "Pass x")]),
                     data=interface.quarantine("suspicious")),
            Scripted("b", calls, data=interface.CONTINUE))
        policy = chain.session("192.0.2.1")
        yield policy.mail("x@y.test")
        yield policy.rcpt("demo@example.test")
        outcome = yield policy.end_of_data(buffer_of(b"From: x@y.test\r\n\r\nhi"))
        self.assertIsNone(outcome.reply)
        self.assertEqual((outcome.folder, outcome.reason), (".Junk", "suspicious"))
        self.assertEqual(calls[-1], ("b", "data"))
        self.assertEqual(outcome.header_lines, [
            "Authentication-Results: mx.example.test;", "\tspf=pass smtp.mailfrom=y.test",
            "Received-SPF: Pass x"])

    @defer.inlineCallbacks
    def test_quarantine_at_connect_applies_to_every_message(self):
        chain = self.chain(Scripted("a", [], connect=interface.quarantine("listed")))
        policy = chain.session("192.0.2.1")
        yield policy.connect()
        for _ in range(2):
            yield policy.mail("x@y.test")
            outcome = yield policy.end_of_data(buffer_of(b"\r\nhi"))
            self.assertEqual(outcome.folder, ".Junk")

    @defer.inlineCallbacks
    def test_no_results_is_an_explicit_none(self):
        chain = self.chain(Scripted("a", [], data=interface.CONTINUE))
        policy = chain.session("192.0.2.1")
        yield policy.mail("")
        outcome = yield policy.end_of_data(buffer_of(b"\r\nhi"))
        self.assertEqual(outcome.header_lines,
                         ["Authentication-Results: mx.example.test;", "\tnone"])

    @defer.inlineCallbacks
    def test_a_failing_checker_is_a_local_error_never_a_pass(self):
        class Broken(Checker):
            name = "broken"
            stages = frozenset({"mail"})

            def mail_from(self, conn, txn):
                raise RuntimeError("bug")

        chain = self.chain(Broken())
        reply = yield chain.session("192.0.2.1").mail("x@y.test")
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_a_checker_answering_something_else_is_a_local_error(self):
        chain = self.chain(Scripted("a", [], mail="yes"))
        reply = yield chain.session("192.0.2.1").mail("x@y.test")
        self.assertEqual(reply.code, 451)
        self.flushLoggedErrors(TypeError)

    def test_a_stage_past_its_budget_is_451_4_4_3(self):
        clock = task.Clock()
        never = defer.Deferred()
        chain = self.chain(Scripted("slow", [], mail=never), clock=clock)
        d = chain.session("192.0.2.1").mail("x@y.test")
        results = []
        d.addCallback(results.append)
        clock.advance(29)
        self.assertEqual(results, [])
        clock.advance(2)
        self.assertEqual((results[0].code, results[0].enhanced), (451, "4.4.3"))
        self.assertTrue(never.called)  # the pending check was cancelled

    @defer.inlineCallbacks
    def test_trusted_and_authenticated_sessions_skip_the_chain(self):
        import ipaddress
        calls = []
        chain = self.chain(Scripted("a", calls, connect=interface.reject("no"),
                                    mail=interface.reject("no")),
                           trusted=[ipaddress.ip_network("192.0.2.0/24")])
        self.assertIsNone((yield chain.session("192.0.2.9").connect()))
        self.assertIsNone((yield chain.session("::ffff:192.0.2.9").connect()))
        policy = chain.session("198.51.100.1")
        self.assertIsNotNone((yield policy.connect()))
        policy.authenticated("demo@example.test")
        self.assertIsNone((yield policy.mail("demo@example.test")))
        self.assertIsNone(policy.message_buffer())
        self.assertEqual(calls, [("a", "connect")])


class LoadingTests(unittest.TestCase):
    def config(self, policy):
        root = Path(self.mktemp())
        root.mkdir()
        return from_dict({"server": {"spool_dir": str(root / "spool")}, "policy": policy},
                         root / "mailstack.toml")

    def test_builtin_checkers_provide_the_interface(self):
        chain = build_chain(self.config({"checkers": ["lists", "ratelimit", "dnsbl", "spf",
                                                      "greylist", "dkim", "arc", "dmarc"]}),
                            None, task.Clock(), immediate)
        self.addCleanup(chain.close)
        self.assertEqual([c.name for c in chain.checkers],
                         ["lists", "ratelimit", "dnsbl", "spf", "greylist", "dkim", "arc",
                          "dmarc"])
        for checker in chain.checkers:
            self.assertTrue(verifyObject(IChecker, checker))
            self.assertLessEqual(set(checker.stages), set(interface.STAGES))

    def test_a_third_party_checker_by_dotted_path_gets_its_settings(self):
        chain = build_chain(self.config({
            "checkers": ["tests.test_policy_chain.ThirdParty"],
            "tests.test_policy_chain.ThirdParty": {"word": "hello", "limit": 3}}),
            None, task.Clock(), immediate)
        checker = chain.checkers[0]
        self.assertIsInstance(checker, ThirdParty)
        self.assertEqual(checker.settings, {"word": "hello", "limit": 3})
        self.assertEqual(checker.env.authserv_id, checker.env.hostname)

    def test_an_unloadable_checker_stops_the_start_with_its_name(self):
        for name, reason in (("tests.nowhere.Checker", "cannot load"),
                             ("tests.test_policy_chain.NotAChecker", "does not provide")):
            with self.assertRaises(ConfigError) as caught:
                build_chain(self.config({"checkers": [name]}), None, task.Clock(), immediate)
            self.assertIn(name, str(caught.exception))
            self.assertIn(reason, str(caught.exception))

    def test_dmarc_needs_spf_and_dkim_before_it(self):
        with self.assertRaises(ConfigError) as caught:
            build_chain(self.config({"checkers": ["dmarc", "spf", "dkim"]}), None,
                        task.Clock(), immediate)
        self.assertIn("dmarc needs spf and dkim before it", str(caught.exception))

    def test_no_checkers_means_no_buffering(self):
        chain = build_chain(self.config({"checkers": []}), None, task.Clock(), immediate)
        policy = chain.session("192.0.2.1")
        policy.mail("x@y.test")
        self.assertFalse(policy.active)
        self.assertIsNone(policy.message_buffer())


class ThirdParty(Checker):
    """The README's example shape: ``Class(settings, env)``."""

    name = "third-party"
    stages = frozenset({"mail"})

    def __init__(self, settings, env):
        self.settings = settings
        self.env = env

    def mail_from(self, conn, txn):
        return defer.succeed(Verdict(interface.Action.CONTINUE))


class NotAChecker:
    def __init__(self, settings, env):
        pass


class ConfigTests(unittest.TestCase):
    def load(self, policy):
        return from_dict({"policy": policy}, "/nonexistent/mailstack.toml")

    def test_defaults(self):
        policy = self.load({}).policy
        self.assertEqual(policy.checkers, ("lists", "ratelimit", "dnsbl", "spf", "dkim", "arc",
                                           "dmarc"))
        self.assertEqual(policy.trusted_networks, ("127.0.0.0/8", "::1/128"))
        self.assertFalse(policy.spf.reject_on_fail)
        self.assertEqual(policy.greylist.delay, 300.0)
        self.assertEqual(policy.dkim.min_rsa_bits, 1024)

    def test_every_problem_is_reported_at_once(self):
        with self.assertRaises(ConfigError) as caught:
            self.load({"checkers": ["spf", "nonsense", "spf"], "trusted_networks": ["10.0.0.300"],
                       "spf": {"reject_on_fail": "yes", "bogus": 1}, "dkim": {"min_rsa_bits": 512},
                       "greylist": {"delay": -1}, "dnsbl": {"zones": ["bad zone"]},
                       "other.Checker": {"x": 1}, "lists": 3, "plugins": {}})
        problems = caught.exception.problems
        for expected in ("policy.spf.reject_on_fail: expected true or false",
                         "policy.spf.bogus: unknown key", "policy.lists: must be a table",
                         "policy.plugins: unknown key",
                         "policy.checkers: 'nonsense' is neither",
                         "policy.checkers: 'spf' is listed twice",
                         "policy.other.Checker: settings for a checker not in policy.checkers",
                         "policy.trusted_networks: '10.0.0.300'",
                         "policy.dkim.min_rsa_bits: RFC 8301",
                         "policy.greylist.delay: must not be negative",
                         "policy.dnsbl.zones: 'bad zone'"):
            self.assertTrue(any(p.startswith(expected) for p in problems),
                            f"{expected!r} not in {problems}")

    def test_the_samples(self):
        etc = Path(__file__).resolve().parent.parent / "etc"
        from mailstack.config import PolicyConfig, load
        # The production sample shows the defaults (keys documented there).
        self.assertEqual(load(etc / "mailstack.toml").policy, PolicyConfig())
        dev = load(etc / "mailstack.dev.toml").policy
        self.assertEqual(dev.trusted_networks, ("127.0.0.1/32",))

    def test_paths_are_relative_to_the_config_file(self):
        config = from_dict({"policy": {"state_dir": "state", "lists": {"file": "lists"}}},
                           "/etc/mailstack/mailstack.toml")
        self.assertEqual(config.policy.state_dir, Path("/etc/mailstack/state"))
        self.assertEqual(config.policy.lists.file, Path("/etc/mailstack/lists"))


class ReadmeExampleTests(unittest.TestCase):
    """The README's "Writing a policy checker" example works as printed."""

    def setUp(self):
        import re
        import sys
        import tomllib
        readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
        section = readme.split("## Writing a policy checker", 1)[1].split("\n## ", 1)[0]
        code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        toml = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        (folder / "example_filters.py").write_text(code)
        sys.path.insert(0, str(folder))
        self.addCleanup(sys.path.remove, str(folder))
        self.addCleanup(sys.modules.pop, "example_filters", None)
        raw = tomllib.loads(toml)
        raw["policy"]["checkers"] = ["example_filters.SubjectChecker"]
        raw["server"] = {"spool_dir": str(folder / "spool")}
        config = from_dict(raw, folder / "mailstack.toml")
        self.chain = build_chain(config, None, task.Clock(), immediate)

    @defer.inlineCallbacks
    def test_it_refuses_and_quarantines(self):
        policy = self.chain.session("192.0.2.1")
        reply = yield policy.mail("Spammer@example.net")
        self.assertEqual((reply.code, reply.enhanced), (550, "5.7.1"))
        yield policy.mail("friend@example.org")
        outcome = yield policy.end_of_data(buffer_of(
            b"From: friend@example.org\r\nSubject: You won the LOTTERY\r\n\r\nhi"))
        self.assertEqual(outcome.folder, ".Junk")
        yield policy.mail("friend@example.org")
        outcome = yield policy.end_of_data(buffer_of(b"Subject: lunch?\r\n\r\nhi"))
        self.assertEqual(outcome.folder, "")


class PoolShareTests(unittest.TestCase):
    def test_checks_get_at_most_half_of_the_pool(self):
        root = Path(self.mktemp())
        config = from_dict({"server": {"threads": 4, "spool_dir": str(root / "spool")},
                            "policy": {"checkers": ["spf"]}}, root / "mailstack.toml")
        started = []
        waiting = []

        def run_blocking(f, *args):
            started.append(f)
            d = defer.Deferred()
            waiting.append(d)
            return d

        chain = build_chain(config, None, task.Clock(), run_blocking)
        results = [chain.env.run_blocking(lambda: None) for _ in range(5)]
        self.assertEqual(len(started), 2)
        waiting[0].callback("done")
        self.assertEqual(self.successResultOf(results[0]), "done")
        self.assertEqual(len(started), 3)
