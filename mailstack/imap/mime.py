"""MIME structure of a message for FETCH: sections, BODYSTRUCTURE, ENVELOPE.

Works on the message bytes with CRLF line ends, by offsets, never decoding or
re-encoding anything: what a client gets for ``BODY[1.2]`` is exactly the
octets of that part, and sizes add up (RFC 3501 6.4.5, 7.4.2). Replaces
Twisted's ``getBodyStructure``/``getEnvelope``, which lower-case parameter
values, fail on parameters without ``=`` and on non-ASCII header text, and
count lines on the decoded text.

Multipart bodies are split on their boundary (RFC 2046 5.1.1: the CRLF before
a delimiter belongs to it); a multipart without a usable boundary is served
as text/plain, as Dovecot does. Nesting is limited to ``MAX_DEPTH`` levels
(SECURITY-TESTS IMAP-7).
"""

from __future__ import annotations

import re

MAX_DEPTH = 50
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_TOKEN = re.compile(rb"[^\x00-\x20()<>@,;:\\\"/\[\]?=\x7f]+")


def crlf(data: bytes) -> bytes:
    """Stored bytes (LF, or CRLF from other tools) as sent: CRLF line ends."""
    if b"\n" not in data:
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def header_end(data: bytes, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """(end of the header fields, start of the body) of the entity at ``start``."""
    end = len(data) if end is None else end
    if data.startswith(b"\r\n", start):
        return start, start + 2
    i = data.find(b"\r\n\r\n", start, end)
    if i < 0:
        return end, end
    return i + 2, i + 4


def header_block(data: bytes, start: int = 0, end: int | None = None) -> bytes:
    """The header fields and the blank line that ends them (added if missing)."""
    hend, _ = header_end(data, start, end)
    head = data[start:hend]
    if head and not head.endswith(b"\r\n"):
        head += b"\r\n"
    return head + b"\r\n"


def parse_fields(header: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(lower-case name, unfolded value, raw field with its CRLF) for each field."""
    fields = []
    for raw in re.split(rb"\r\n(?![ \t])", header):
        if not raw:
            continue
        m = _FIELD.match(raw)
        if not m:
            continue
        value = raw[m.end():].replace(b"\r\n", b"").strip()
        fields.append((m.group(1).lower(), value, raw + b"\r\n"))
    return fields


def header_fields(header: bytes, names: list[bytes], negate: bool) -> bytes:
    """HEADER.FIELDS (.NOT): the chosen fields as they are, then the blank line."""
    wanted = {n.lower() for n in names}
    out = [raw for name, _, raw in parse_fields(header) if (name in wanted) != negate]
    return b"".join(out) + b"\r\n"


class Part:
    """One MIME entity: its header, its body, and what is inside the body."""

    __slots__ = ("data", "start", "hend", "body", "end", "fields", "type", "subtype",
                 "params", "children", "message")

    def __init__(self, data: bytes, start: int, end: int, depth: int = 0,
                 default: tuple[bytes, bytes] = (b"text", b"plain")):
        self.data = data
        self.start, self.end = start, end
        self.hend, self.body = header_end(data, start, end)
        self.fields = parse_fields(data[start:self.hend])
        self.children: list[Part] = []
        self.message: Part | None = None
        ctype = self.get(b"content-type")
        self.type, self.subtype, self.params = parse_content_type(ctype, default)
        if depth >= MAX_DEPTH:
            return
        if self.type == b"multipart":
            boundary = dict((k.lower(), v) for k, v in self.params).get(b"boundary")
            sub_default = (b"message", b"rfc822") if self.subtype == b"digest" else \
                (b"text", b"plain")
            if boundary:
                for s, e in split_multipart(data, self.body, end, boundary):
                    self.children.append(Part(data, s, e, depth + 1, sub_default))
            if not self.children:
                self.type, self.subtype, self.params = b"text", b"plain", []
        elif (self.type, self.subtype) in ((b"message", b"rfc822"), (b"message", b"global")):
            self.message = Part(data, self.body, end, depth + 1)

    def get(self, name: bytes) -> bytes | None:
        for field, value, _ in self.fields:
            if field == name:
                return value
        return None

    @property
    def header(self) -> bytes:
        return header_block(self.data, self.start, self.end)

    @property
    def text(self) -> bytes:
        return self.data[self.body:self.end]

    def lines(self) -> int:
        body = self.text
        return body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)


def split_multipart(data: bytes, start: int, end: int, boundary: bytes):
    """(start, end) of each body part between ``--boundary`` delimiter lines."""
    delim = b"--" + boundary
    parts = []
    pos = start
    current = None
    while pos <= end:
        if data.startswith(delim, pos):
            after = pos + len(delim)
            closing = data.startswith(b"--", after)
            eol = data.find(b"\r\n", after, end)
            line_rest = data[after + (2 if closing else 0):eol if eol >= 0 else end]
            if not line_rest.strip(b" \t"):
                if current is not None:
                    # The CRLF before the delimiter belongs to it (RFC 2046 5.1.1).
                    stop = pos - 2 if pos - 2 >= current and data[pos - 2:pos] == b"\r\n" \
                        else pos
                    parts.append((current, stop))
                if closing:
                    return parts
                current = eol + 2 if eol >= 0 else end
                pos = current
                continue
        nl = data.find(b"\r\n", pos, end)
        if nl < 0:
            break
        pos = nl + 2
    if current is not None and current <= end:
        parts.append((current, end))  # no closing delimiter: the last part runs to the end
    return parts


def parse_content_type(value: bytes | None, default: tuple[bytes, bytes]):
    """(type, subtype, [(attribute, value)]) in lower case for type and subtype."""
    if value is None:
        params = [(b"CHARSET", b"us-ascii")] if default == (b"text", b"plain") else []
        return default[0], default[1], params
    value = _strip_comments(value)
    main, _, rest = value.partition(b";")
    t, slash, s = main.strip().partition(b"/")
    t, s = t.strip().lower(), s.strip().lower()
    if not slash or not _TOKEN.fullmatch(t) or not _TOKEN.fullmatch(s):
        return b"text", b"plain", [(b"CHARSET", b"us-ascii")]
    params = parse_params(rest)
    if t == b"text" and not any(k == b"CHARSET" for k, _ in params):
        params.insert(0, (b"CHARSET", b"us-ascii"))  # RFC 2045 5.2 default, as Dovecot says
    return t, s, params


def parse_params(text: bytes) -> list[tuple[bytes, bytes]]:
    """``; a=b; c="d e"`` -> [(A, b), (C, d e)]; names upper-cased, values as written."""
    params = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i:i + 1] in b" \t;":
            i += 1
        m = _TOKEN.match(text, i)
        if not m:
            nxt = text.find(b";", i)
            if nxt < 0:
                break
            i = nxt + 1
            continue
        name = m.group(0)
        i = m.end()
        while i < n and text[i:i + 1] in b" \t":
            i += 1
        if text[i:i + 1] != b"=":
            continue
        i += 1
        while i < n and text[i:i + 1] in b" \t":
            i += 1
        if text[i:i + 1] == b'"':
            out = bytearray()
            i += 1
            while i < n and text[i:i + 1] != b'"':
                if text[i:i + 1] == b"\\" and i + 1 < n:
                    i += 1
                out += text[i:i + 1]
                i += 1
            i += 1
            value = bytes(out)
        else:
            j = text.find(b";", i)
            j = n if j < 0 else j
            value = text[i:j].strip()
            i = j
        params.append((name.upper(), value))
    return params


def _strip_comments(value: bytes) -> bytes:
    if b"(" not in value:
        return value
    out = bytearray()
    depth = 0
    quoted = False
    for c in value:
        ch = bytes([c])
        if quoted:
            out.append(c)
            if ch == b'"':
                quoted = False
        elif ch == b'"' and not depth:
            quoted = True
            out.append(c)
        elif ch == b"(":
            depth += 1
        elif ch == b")" and depth:
            depth -= 1
        elif not depth:
            out.append(c)
    return bytes(out)


# -- BODYSTRUCTURE (RFC 3501 7.4.2) -------------------------------------------
def body_structure(part: Part, extended: bool) -> list:
    if part.children:
        result = [body_structure(c, extended) for c in part.children]
        result.append(part.subtype.upper())
        if extended:
            result += [_params(part.params), _disposition(part), _language(part),
                       part.get(b"content-location")]
        return result
    encoding = part.get(b"content-transfer-encoding")
    result = [part.type.upper(), part.subtype.upper(), _params(part.params),
              part.get(b"content-id"), part.get(b"content-description"),
              encoding.upper() if encoding else b"7BIT", part.end - part.body]
    if part.message is not None:
        result += [envelope(part.message), body_structure(part.message, extended),
                   part.lines()]
    elif part.type == b"text":
        result.append(part.lines())
    if extended:
        result += [part.get(b"content-md5"), _disposition(part), _language(part),
                   part.get(b"content-location")]
    return result


def _params(params):
    if not params:
        return None
    return [x for pair in params for x in pair]


def _disposition(part: Part):
    value = part.get(b"content-disposition")
    if not value:
        return None
    value = _strip_comments(value)
    kind, _, rest = value.partition(b";")
    kind = kind.strip()
    if not kind:
        return None
    return [kind.upper(), _params(parse_params(rest))]


def _language(part: Part):
    value = part.get(b"content-language")
    if not value:
        return None
    langs = [v.strip() for v in _strip_comments(value).split(b",") if v.strip()]
    return langs[0] if len(langs) == 1 else (langs or None)


# -- ENVELOPE (RFC 3501 7.4.2) --------------------------------------------------
def envelope(part: Part) -> list:
    def first(name):
        return part.get(name)

    from_ = addresses(first(b"from"))
    sender = addresses(first(b"sender")) or from_
    reply_to = addresses(first(b"reply-to")) or from_
    return [first(b"date"), first(b"subject"), from_, sender, reply_to,
            addresses(first(b"to")), addresses(first(b"cc")), addresses(first(b"bcc")),
            first(b"in-reply-to"), first(b"message-id")]


_ADDR_TOKEN = re.compile(rb'\s*(?:("(?:[^"\\]|\\.)*"?)|(\()|([<>:;,@])|([^\s"(<>:;,@]+))',
                         re.S)


def _tokens(value: bytes):
    tokens = []
    i, n = 0, len(value)
    while i < n:
        m = _ADDR_TOKEN.match(value, i)
        if not m or m.end() == i:
            break
        i = m.end()
        quoted, comment, special, word = m.groups()
        if comment:
            depth = 1
            while i < n and depth:
                c = value[i:i + 1]
                if c == b"\\":
                    i += 1
                elif c == b"(":
                    depth += 1
                elif c == b")":
                    depth -= 1
                i += 1
            continue
        if quoted is not None:
            tokens.append(("q", quoted))
        elif special:
            tokens.append((special.decode(), special))
        elif word:
            tokens.append(("w", word))
    return tokens


def _phrase(tokens) -> bytes | None:
    words = []
    for kind, text in tokens:
        if kind == "q":
            text = re.sub(rb"\\(.)", rb"\1", text.strip(b'"'))
        words.append(text)
    return b" ".join(words) or None


def _addr_spec(tokens) -> list:
    # Drop a source route ("@a,@b:") from an angle address.
    if ":" in [k for k, _ in tokens]:
        idx = max(i for i, (k, _) in enumerate(tokens) if k == ":")
        route = b"".join(t for _, t in tokens[:idx]) or None
        tokens = tokens[idx + 1:]
    else:
        route = None
    ats = [i for i, (k, _) in enumerate(tokens) if k == "@"]
    if ats:
        local = b"".join(t for _, t in tokens[:ats[-1]])
        host = b"".join(t for _, t in tokens[ats[-1] + 1:])
    else:
        local, host = b"".join(t for _, t in tokens), b""
    return [route, local or None, host]


def addresses(value: bytes | None) -> list | None:
    """An address list as RFC 3501 address structures, with group markers."""
    if not value:
        return None
    tokens = _tokens(value)
    result = []
    current: list = []
    in_group = False

    def flush():
        if not current:
            return
        kinds = [k for k, _ in current]
        if "<" in kinds:
            lt = kinds.index("<")
            gt = kinds.index(">") if ">" in kinds[lt:] else len(current)
            name = _phrase([t for t in current[:lt]])
            route, local, host = _addr_spec(current[lt + 1:gt])
        else:
            name = None
            route, local, host = _addr_spec(current)
        if local or host:
            result.append([name, route, local, host])
        current.clear()

    for kind, text in tokens:
        if kind == ":" and not in_group and "<" not in [k for k, _ in current]:
            result.append([None, None, _phrase(current) or b"", None])
            current.clear()
            in_group = True
        elif kind == ";" and in_group:
            flush()
            result.append([None, None, None, None])
            in_group = False
        elif kind == ",":
            flush()
        else:
            current.append((kind, text))
    flush()
    if in_group:
        result.append([None, None, None, None])
    return result or None


# -- sections (RFC 3501 6.4.5) ---------------------------------------------------
def find_part(root: Part, numbers: tuple[int, ...]) -> Part | None:
    node = root
    for i, n in enumerate(numbers):
        container = node.message if (i > 0 and node.message is not None) else node
        if container.children:
            if n > len(container.children):
                return None
            node = container.children[n - 1]
        elif n == 1 and (i == 0 or container is not node):
            node = container  # the body of a single-part message is its part 1
        else:
            return None
    return node


def section(data: bytes, numbers: tuple[int, ...], spec: str,
            fields: list[bytes] = ()) -> bytes | None:
    """The octets of BODY[<numbers>.<spec>] of ``data`` (CRLF), or None if absent."""
    if not numbers and spec in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        head = header_block(data)
        if spec == "HEADER":
            return head
        return header_fields(head, fields, spec.endswith(".NOT"))
    if not numbers and spec == "":
        return data
    if not numbers and spec == "TEXT":
        return data[header_end(data)[1]:]
    root = Part(data, 0, len(data))
    node = find_part(root, numbers)
    if node is None:
        return None
    if spec == "":
        return node.text
    if spec == "MIME":
        return node.header
    target = node.message
    if target is None:
        return None
    if spec == "TEXT":
        return target.text
    if spec == "HEADER":
        return target.header
    return header_fields(target.header, fields, spec.endswith(".NOT"))


# -- IMAP encoding of values ------------------------------------------------------
def quote(value: bytes) -> bytes:
    """A string as an IMAP quoted string, or a literal if it cannot be one."""
    if len(value) > 1024 or any(c < 0x20 or c > 0x7E for c in value):
        return b"{%d}\r\n%b" % (len(value), value)
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def sexp(value) -> bytes:
    """Python values as an IMAP parenthesised list: None is NIL, bytes a string."""
    if value is None:
        return b"NIL"
    if isinstance(value, int):
        return b"%d" % value
    if isinstance(value, bytes):
        return quote(value)
    if isinstance(value, str):
        return quote(value.encode("utf-8"))
    return b"(" + b" ".join(sexp(v) for v in value) + b")"
