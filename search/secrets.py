"""Secrets of a storage URL, and hiding them in any text: the URL is parsed once, as its database driver reads it.

    secrets_of("postgresql://user:Zz'W\\"r@host/db?sslpassword=k")   # ("Zz'W\\"r", "k")
    redact(message, url)                                            # every form of each secret -> ***

What is secret: the password of ``scheme://user:password@host``, and the value of every query parameter whose
name says it holds one (password, passwd, pwd, sslpassword, sslkey, secret, token, api_key, ...). The URL is
split with the rules SQLAlchemy's ``make_url`` applies (the user ends at the first ':' or '/', the password at
the next '@', parameters are ``&``-separated and percent-decoded with '+' as a space), so the values found are
exactly the ones the driver is given. Where a raw '@' makes the reading ambiguous, every reading counts: the
password runs up to the last '@' and each piece between its '@'s is a secret too (a driver would take them
for the host), and the parameters after the first '?' of the whole URL are read as well.

Each secret is then known in every form a message may show it in: as written in the URL, percent-decoded,
percent-encoded the ways SQLAlchemy and urllib render it, with backslash-escaped quotes and backslashes (what
``repr()`` of a message, a libpq connection string or a C-style driver prints), as ``ascii()`` and JSON escape
non-ASCII characters, with quotes doubled (SQL, CSV) and as the ``repr`` of its UTF-8 bytes. :func:`redact`
replaces each of them, longest first, wherever it occurs. A form shorter than 3 characters is replaced only
where the URL itself is quoted (replacing every 'a' of a message would leave nothing to read).

Text quoting a URL this module was not given is still scanned for ``scheme://user:password@``, bare
``user:password@host`` and ``password=...``; that fallback cannot know where a password with a space or a
quote ends, which is why every caller that has the storage URL passes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, quote_plus, unquote, unquote_plus

MASK = "***"
MIN_FREE = 3  # shorter forms are replaced only inside quoted copies of the URL
SECRET_WORDS = ("pass", "pwd", "secret", "token", "key", "credential", "auth")  # in a query parameter's name

_SCHEME = re.compile(r"[\w+]+://")  # what SQLAlchemy accepts as a dialect[+driver] name
_URL_IN_TEXT = re.compile(r"(://[^\s'\"/:@]*:)[^\s'\"]*@")  # scheme://user:PASSWORD@ up to the last @ of a word
_BARE_IN_TEXT = re.compile(r"(?<![^\s'\"(=,])([A-Za-z0-9._%+-]+:)(?!//)[^\s'\"]*@")  # user:PASSWORD@host
_KEY_IN_TEXT = re.compile(r"(?i)\b(password|passwd|pwd|sslpassword)=[^\s&;'\"]+")  # ?password=... and DSNs


@dataclass(frozen=True)
class ParsedURL:
    """A storage URL split into its parts, with the positions of its secrets in the text as given."""

    text: str
    scheme: str  # '' for a bare user:password@host
    user: str  # as written (percent-encoded)
    password: str | None  # as written; None when the URL has none
    rest: str  # host, port, database and query, as written
    spans: tuple[tuple[int, int], ...]  # [start, end) of each secret's raw text in ``text``
    raw: tuple[str, ...]  # each secret as written in the URL
    decoded: tuple[str, ...]  # each secret as the driver is given it

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s for s in (*self.decoded, *self.raw) if s))

    def redacted(self) -> str:
        """The URL with each secret replaced by ***, everything else as written."""
        merged: list[list[int]] = []
        for a, b in self.spans:  # sorted; overlapping readings of one secret become one mask
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        out, last = [], 0
        for a, b in merged:
            out += [self.text[last:a], MASK]
            last = b
        return "".join(out) + self.text[last:]


def is_secret_key(name: str) -> bool:
    """Whether a query parameter (or connection option) called ``name`` holds a secret."""
    n = name.lower()
    return any(w in n for w in SECRET_WORDS)


@lru_cache(maxsize=64)
def parse(url: str) -> ParsedURL | None:
    """``url`` split as SQLAlchemy's make_url splits it (None when it has no user part and no query, or is not
    a string). A string without a scheme is read as ``user:password@host...``."""
    if not isinstance(url, str) or not url:
        return None
    m = _SCHEME.match(url)
    head = m.end() if m else 0
    scheme = url[: head - 3] if m else ""
    body = url[head:]
    spans: list[tuple[int, int]] = []
    raw: list[str] = []
    decoded: list[str] = []
    user, password, rest = "", None, body
    # user: up to the first ':' or '/'; then either '@' (no password) or ':' and a password up to the first '@'
    cut = re.match(r"[^:/]*", body).end()
    if cut < len(body) and body[cut] == ":" and "@" in body[cut + 1 :]:
        at = body.index("@", cut + 1)
        user, password, rest = body[:cut], body[cut + 1 : at], body[at + 1 :]
        last = body.rindex("@")
        if last != at:  # a raw '@' in the password (the driver takes what follows the first one for the host):
            password, rest = body[cut + 1 : last], body[last + 1 :]  # hide up to the last '@', and each piece
        spans.append((head + cut + 1, head + cut + 1 + len(password)))
        raw.append(password)
        decoded.append(unquote(password))
        for piece in password.split("@"):  # what a driver splitting at an '@' would show
            raw.append(piece)
            decoded.append(unquote(piece))
    elif "@" in body[:cut]:
        at = body.rindex("@", 0, cut)
        user, rest = body[:at], body[at + 1 :]
    elif not m:
        return None  # neither a URL nor user:password@host
    # the query: after the first '?' that follows the user part (the driver's reading), and, in case the user
    # part was misread (a raw '@' in a parameter), after the first '?' of the whole URL as well
    starts = {len(url) - len(rest) + rest.find("?") + 1} if "?" in rest else set()
    if "?" in body:
        starts.add(head + body.index("?") + 1)
    for base in sorted(starts):
        pos = 0
        for pair in url[base:].split("&"):
            key, eq, value = pair.partition("=")
            if eq and value and is_secret_key(unquote_plus(key)):
                start = base + pos + len(key) + 1
                spans.append((start, start + len(value)))
                raw.append(value)
                decoded.append(unquote_plus(value))
            pos += len(pair) + 1
    if not m and not spans:
        return None
    return ParsedURL(url, scheme, user, password, rest, tuple(sorted(set(spans))), tuple(raw), tuple(decoded))


def secrets_of(url) -> tuple[str, ...]:
    """Every secret of a storage URL, as written and as the driver is given it; () for a URL without any."""
    p = parse(url) if isinstance(url, str) else None
    return p.secrets if p else ()


def password_of(url) -> str:
    """The password of a storage URL as written in it ('' if none): the part :func:`redact` hides first."""
    p = parse(url) if isinstance(url, str) else None
    return (p.password or "") if p else ""


def forms(secret: str) -> set[str]:
    """The ways a message may show ``secret``: plain, percent-encoded or -decoded, escaped, quoted."""
    base = {secret, unquote(secret), unquote_plus(secret)}
    out = set()
    for s in base:
        out |= {s, quote(s, safe=""), quote(s), quote(s, safe=" +"), quote_plus(s), s.replace(" ", "+")}
        out |= {
            repr(s)[1:-1],
            ascii(s)[1:-1],
            json.dumps(s)[1:-1],
            json.dumps(s, ensure_ascii=False)[1:-1],
            repr(s.encode("utf-8", "backslashreplace"))[2:-1],
            s.replace("'", "''"),
            s.replace('"', '""'),
        }
        for bs in (s, s.replace("\\", "\\\\")):
            for quotes in ("'", '"', "'\""):
                t = bs
                for ch in quotes:
                    t = t.replace(ch, "\\" + ch)
                out.add(t)
            out.add(bs)
    return {f for f in out if f}


@lru_cache(maxsize=64)
def _plan(url: str) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """(copies of the URL -> their redacted copies, free forms to mask) for ``url``, longest first."""
    p = parse(url)
    if p is None or not p.spans:
        return (), ()
    whole = {}
    red = p.redacted()
    tail = p.text[len(p.scheme) + 3 :] if p.scheme else p.text
    red_tail = red[len(p.scheme) + 3 :] if p.scheme else red
    for text, masked in ((p.text, red), (tail, red_tail)):  # the tail: a driver may rewrite the scheme
        for f in (text, repr(text)[1:-1], ascii(text)[1:-1], json.dumps(text)[1:-1], text.replace("\\", "\\\\")):
            whole.setdefault(f, masked)
    free = set()
    for s in p.secrets:
        free |= {f for f in forms(s) if len(f) >= MIN_FREE}
    return (tuple(sorted(whole.items(), key=lambda kv: -len(kv[0]))), tuple(sorted(free, key=lambda f: (-len(f), f))))


def redact(text, url: str | None = None) -> str:
    """``text`` (a URL, or any message, log line or file content) with every secret replaced by ***.

    ``url`` is the storage URL the text may quote; without it, a ``text`` that is itself a URL is parsed as
    one. Other URLs quoted in ``text`` are masked by the fallback patterns (see the module's docstring).
    """
    if text is None:
        return ""
    out = str(text)
    if url is None and "\n" not in out and _SCHEME.match(out):
        url = out
    if isinstance(url, str) and url:
        whole, free = _plan(url)
        for f, masked in whole:
            out = out.replace(f, masked)
        for f in free:
            out = out.replace(f, MASK)
    return _KEY_IN_TEXT.sub(r"\1=***", _BARE_IN_TEXT.sub(r"\1***@", _URL_IN_TEXT.sub(r"\1***@", out)))
