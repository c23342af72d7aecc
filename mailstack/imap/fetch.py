"""FETCH: the data items (RFC 3501 6.4.5, 7.4.2) parsed and rendered.

Replaces Twisted's ``_FetchParser`` and ``spew_*`` for these reasons:
``BODY[2]`` of a single-part message raised out of the producer and dropped
the connection; a partial fetch ``<0.10>`` was answered as ``BODY[]<0.10>``
or ``<0>`` depending on the size and not cut (Twisted #5613): here the answer
is ``BODY[]<0>`` with exactly the requested octets; quoted field names and
nesting limits were not handled. Messages are read only as far as needed:
flags, UIDs and sizes come from the index, HEADER.FIELDS and ENVELOPE read
the header only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mailstack.imap.mime import (Part, body_structure, crlf, envelope, header_block,
                                 quote, section, sexp)
from mailstack.imap.parser import MAX_DEPTH, Parser

_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_SIMPLE = (b"ENVELOPE", b"FLAGS", b"INTERNALDATE", b"RFC822.HEADER", b"RFC822.SIZE",
           b"RFC822.TEXT", b"RFC822", b"UID", b"BODYSTRUCTURE")
_MACROS = {b"ALL": [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE"],
           b"FAST": [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"],
           b"FULL": [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY"]}


@dataclass
class Item:
    name: bytes  # FLAGS, UID, ..., BODY (structure) or BODY[ (a section)
    peek: bool = False
    part: tuple[int, ...] = ()
    spec: str = ""
    fields: list[bytes] = field(default_factory=list)
    partial: tuple[int, int] | None = None

    @property
    def sets_seen(self) -> bool:
        return (self.name == b"BODY[" and not self.peek) or self.name in (b"RFC822",
                                                                          b"RFC822.TEXT")

    @property
    def needs(self) -> str:
        """What of the message it reads: "" (index only), "header" or "all"."""
        if self.name in (b"ENVELOPE", b"RFC822.HEADER"):
            return "header"
        if self.name == b"BODY[" and not self.part and self.spec.startswith("HEADER"):
            return "header"
        if self.name in (b"BODYSTRUCTURE", b"BODY", b"BODY[", b"RFC822", b"RFC822.TEXT"):
            return "all"
        return ""

    def key(self) -> bytes:
        if self.name != b"BODY[":
            return self.name
        spec = ".".join(str(n) for n in self.part)
        if self.spec:
            spec = (spec + "." if spec else "") + self.spec
        out = b"BODY[" + spec.encode("ascii")
        if self.fields:
            out += b" (" + b" ".join(_astring(f) for f in self.fields) + b")"
        out += b"]"
        if self.partial is not None:
            out += b"<%d>" % self.partial[0]
        return out


def _astring(value: bytes) -> bytes:
    if value and all(0x21 <= c <= 0x7E and c not in b'(){%*"\\]' for c in value):
        return value
    return quote(value)


def parse_items(p: Parser) -> list[Item]:
    """fetch-att, a macro, or a parenthesised list of fetch-att."""
    for macro, names in _MACROS.items():
        if p.take(macro):
            if p.peek() not in (b"", b" "):
                p.fail("Unknown FETCH item")
            return [Item(n) for n in names]
    if p.take(b"("):
        items = [_item(p)]
        while not p.take(b")"):
            p.sp()
            items.append(_item(p))
        return items
    return [_item(p)]


def _item(p: Parser) -> Item:
    if p.take(b"BODY.PEEK["):
        return _section(p, Item(b"BODY[", peek=True))
    if p.take(b"BODY["):
        return _section(p, Item(b"BODY["))
    for name in _SIMPLE:
        if p.take(name):
            if p.peek() not in (b"", b" ", b")"):
                p.fail("Unknown FETCH item")
            return Item(name)
    if p.take(b"BODY"):
        return Item(b"BODY")
    p.fail("Unknown FETCH item")


def _section(p: Parser, item: Item) -> Item:
    parts = []
    while p.peek().isdigit():
        parts.append(p.nz_number())
        if len(parts) > MAX_DEPTH:
            p.fail("Section part number too deep")
        if not p.take(b"."):
            break
    item.part = tuple(parts)
    if p.peek() != b"]":
        for spec in ("HEADER.FIELDS.NOT", "HEADER.FIELDS", "HEADER", "TEXT", "MIME"):
            if p.take(spec.encode()):
                item.spec = spec
                break
        else:
            p.fail("Bad section")
        if item.spec == "MIME" and not parts:
            p.fail("MIME needs a part number")
        if item.spec.startswith("HEADER.FIELDS"):
            p.sp()
            p.expect(b"(")
            item.fields = [p.astring()]
            while not p.take(b")"):
                p.sp()
                item.fields.append(p.astring())
    elif parts and p.data[p.pos - 1:p.pos] == b".":
        p.fail("Bad section")
    p.expect(b"]")
    if p.take(b"<"):
        start = p.number()
        p.expect(b".")
        length = p.nz_number()
        p.expect(b">")
        item.partial = (start, length)
    return item


def internal_date(when: float) -> bytes:
    t = time.gmtime(when)
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
        t.tm_mday, _MONTHS[t.tm_mon - 1].encode(), t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


def render(mailbox, seq: int, uid: int, items: list[Item], with_uid: bool) -> bytes:
    """One ``* n FETCH (...)`` response (without CRLF); OSError if the file is gone."""
    index = mailbox.index
    needs = {i.needs for i in items}
    data = header = None
    if "all" in needs:
        data = crlf(index.read(uid))
    elif "header" in needs:
        header = header_block(crlf(index.read_header(uid)))
    root = None
    out = []
    if with_uid and not any(i.name == b"UID" for i in items):
        out.append(b"UID %d" % uid)
    for item in items:
        name = item.name
        if name == b"UID":
            out.append(b"UID %d" % uid)
        elif name == b"FLAGS":
            out.append(mailbox.flags_response(uid))
        elif name == b"RFC822.SIZE":
            out.append(b"RFC822.SIZE %d" % index.wsize(uid))
        elif name == b"INTERNALDATE":
            out.append(b"INTERNALDATE " + internal_date(index.mtime(uid)))
        elif name == b"ENVELOPE":
            head = header if header is not None else header_block(data)
            out.append(b"ENVELOPE " + sexp(envelope(Part(head, 0, len(head)))))
        elif name in (b"BODYSTRUCTURE", b"BODY"):
            root = root or Part(data, 0, len(data))
            out.append(name + b" " + sexp(body_structure(root, name == b"BODYSTRUCTURE")))
        elif name == b"RFC822":
            out.append(b"RFC822 " + _literal(data))
        elif name == b"RFC822.HEADER":
            out.append(b"RFC822.HEADER " + _literal(header if header is not None
                                                     else header_block(data)))
        elif name == b"RFC822.TEXT":
            out.append(b"RFC822.TEXT " + _literal(section(data, (), "TEXT")))
        else:
            source = data if data is not None else header
            value = section(source, item.part, item.spec, item.fields)
            if value is None:
                out.append(item.key() + b" NIL")
                continue
            if item.partial is not None:
                start, length = item.partial
                value = value[start:start + length]
            out.append(item.key() + b" " + _literal(value))
    return b"* %d FETCH (" % seq + b" ".join(out) + b")"


def _literal(value: bytes) -> bytes:
    return b"{%d}\r\n%b" % (len(value), value)
