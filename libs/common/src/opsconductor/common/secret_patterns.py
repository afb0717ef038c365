"""What secret-shaped text looks like, and how to redact it in free text.

Used by `opsconductor.common.masking`, which adds key-based masking, registered literals and
the logging integration on top. Every function here returns its input unchanged (the same
object) when there is nothing to redact, and is written for the logging hot path: each pass
runs only when a substring it cannot match without is present, because plain ``in`` and
``str.find`` checks are much cheaper than a regex scan and most log strings need no pass at all.

Patterns (all replaced by `REDACTED`):

- ``name: value`` / ``name=value`` / ``"name": "value"`` / ``'name': 'value'`` where the caller's
  ``is_secret_name(name)`` says so; ``Authorization:`` / ``Cookie:`` header lines up to the end
  of the line; ``name=Bearer x`` keeps the scheme;
- PEM private-key blocks (also when truncated before the ``END`` line);
- ``scheme://user:password@host`` -> ``scheme://user:***REDACTED***@host``;
- ``Bearer <token>``, ``Basic <base64>`` (the scheme stays), JWTs (``eyJ….….…``), AWS access
  key ids (``AKIA…`` and the other documented prefixes);
- the quoted character or byte of a codec error (``'ascii' codec can't encode character
  '\\xe9' in position 5``): it is a piece of whatever was being encoded, often a secret.

`literal_forms` lists the encodings of a known secret value that the masker also redacts.
"""

from __future__ import annotations

import base64
import json
import re
import string
from collections.abc import Callable, Iterable
from typing import Any, Final
from urllib.parse import quote, quote_plus

__all__ = ["REDACTED", "credential_kind", "literal_forms", "literal_regex", "redact_patterns"]

REDACTED: Final = "***REDACTED***"

# Words one of which every denylisted name contains: text without one skips the pair scan.
TRIGGERS: Final = (
    "pass", "pwd", "token", "secret", "credential", "key", "authorization", "cookie", "session",
    "sid", "jwt",
)  # fmt: skip
_AWS_PREFIXES: Final = ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "AIPA", "ANPA", "ANVA", "APKA")

_PEM = re.compile(
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----"
    r"(?:(?s:.*?)-----END[A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----|[A-Za-z0-9+/=\s\\:,-]*)"
)
# A `name<sep>value` pair, matched from where a name containing a trigger word starts. Triggers
# are found with str.find: a regex looking for names at every word start is ~50x slower on a
# rendered JSON line. Bare values stop at separators and never start with a bracket.
_PAIR_AT = re.compile(
    r"""(?P<name>[\w.$-]+)["']?(?P<sep>[ \t]*[:=][ \t]*)
        (?P<value>"(?:[^"\\\n]|\\.)*"
          |'(?:[^'\\\n]|\\.)*'
          |(?:bearer|basic|digest|negotiate)[ \t]+[^\s,;'"\\]+
          |[^\s,;'"\\&}\])({\[][^\s,;'"\\&}\])]*
          |["'][^\s,;'"\\&}\])]+)  # an unterminated quote""",
    re.IGNORECASE | re.VERBOSE,
)
# Header values ("Digest a=1, b=2", "a=1; b=2") run to the end of the line.
_HEADER_VALUE_END = re.compile(r"[\r\n\"'\\]")
_NAME_CHARS: Final = frozenset(string.ascii_letters + string.digits + "_.$-")
_JSON_LITERALS: Final = frozenset({"null", "true", "false"})
# After "scheme://": user ":" password "@" -- the password may contain '@': up to the last one.
_URL_CREDENTIALS_AT = re.compile(r"[^\s:/@\"'\\]*:(?P<password>[^\s/\"'\\]+)@")
# Tokens are long; a short word after "bearer" is prose ("the bearer of bad news").
_BEARER = re.compile(r"\b(?P<scheme>bearer)[ \t]+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)
# "Basic" + base64 holding a digit, '+', '/', '=' or a lower-to-upper step: "Basic
# Authentication" is prose, "Basic dXNlcjpwYXNz" is a credential.
_BASIC = re.compile(
    r"\b(?P<scheme>(?i:basic))[ \t]+"
    r"(?=[A-Za-z0-9+/]*(?:[0-9+/=]|[a-z][A-Z]))[A-Za-z0-9+/]{8,}={0,2}"
)
_JWT = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_AWS = re.compile(r"(?<![A-Z0-9])(?:" + "|".join(_AWS_PREFIXES) + r")[A-Z0-9]{16}(?![A-Z0-9])")
# Whether any of the prefixes occurs at all: one scan for their common first letter instead of
# nine substring searches (~15x cheaper on a rendered log line, which rarely has one).
_AWS_PREFIX = re.compile("|".join(_AWS_PREFIXES))
_SCHEME_REDACTED: Final = r"\g<scheme> " + REDACTED
# UnicodeEncodeError / UnicodeDecodeError messages quote the offending character or byte.
_CODEC_ERROR = re.compile(
    r"(?P<lead>codec can't (?:en|de)code (?:character|byte)s? )"
    r"(?P<quoted>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|0x[0-9a-fA-F]+)"
)


def redact_patterns(text: str, is_secret_name: Callable[[str], bool]) -> str:
    """``text`` with every secret-shaped substring (see the module docstring) redacted."""
    lower = text.lower()
    if "-----begin" in lower:
        text = _PEM.sub(REDACTED, text)
        lower = text.lower()
    if ("=" in text or ":" in text) and any(t in lower for t in TRIGGERS):
        text = _redact_pairs(text, is_secret_name)
    if "://" in text:
        text = _redact_url_credentials(text)
    if "bearer" in lower:
        text = _BEARER.sub(_SCHEME_REDACTED, text)
    if "basic" in lower:
        text = _BASIC.sub(_SCHEME_REDACTED, text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    if _AWS_PREFIX.search(text) is not None:
        text = _AWS.sub(REDACTED, text)
    if "codec can't" in text:
        text = _CODEC_ERROR.sub(r"\g<lead>" + REDACTED, text)
    return text


def _base64_forms(data: bytes) -> set[str]:
    """Base64 (standard and URL-safe) of ``data`` alone, padded and not, and the part of it
    that is the same wherever ``data`` sits inside a longer encoded text.

    Embedded, ``data`` starts at byte offset 0, 1 or 2 of a 3-byte group: for each offset ``k``
    the characters whose 6 bits come from ``data`` only are those from ``ceil(8k/6)`` up to
    ``floor(8(k + len)/6)`` of the encoding of ``k`` filler bytes + ``data``.
    """
    forms: set[str] = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        alone = encode(data).decode("ascii")
        forms |= {alone, alone.rstrip("=")}
        for k in (0, 1, 2):
            encoded = encode(b"\0" * k + data).decode("ascii")
            forms.add(encoded[(8 * k + 5) // 6 : (8 * (k + len(data))) // 6])
    return forms


def literal_forms(value: str) -> frozenset[str]:
    """``value`` and the forms it takes when echoed back encoded: JSON-escaped (ASCII-only or
    not, and escaped twice, as in JSON inside JSON), URL-encoded (``quote`` with and without
    ``/`` safe, ``quote_plus``), base64 standard and URL-safe (`_base64_forms`), and reversed."""
    forms = {value, value[::-1]}
    for escaped in (json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]):
        forms |= {escaped, json.dumps(escaped)[1:-1]}
    forms |= {quote(value, safe=""), quote(value), quote_plus(value, safe="")}
    forms |= _base64_forms(value.encode("utf-8"))
    return frozenset(forms)


_URL_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@\"'\\]*:[^\s/\"'\\]+@")
#: What `credential_kind` recognises, most specific first.
_CREDENTIAL_SHAPES: Final = (
    ("a PEM private key", _PEM),
    ("a JSON Web Token", _JWT),
    ("a Bearer token", _BEARER),
    ("Basic credentials", _BASIC),
    ("an AWS access key id", _AWS),
    ("a password in a URL", _URL_WITH_PASSWORD),
)


def credential_kind(text: str) -> str | None:
    """What kind of literal credential ``text`` contains (``"a Bearer token"``...), if any.

    For refusing plans that paste a credential where a secret reference belongs; the same
    shapes `redact_patterns` redacts, without the name-based pairs (a plan names its fields).
    """
    if len(text) < 8:
        return None
    for kind, pattern in _CREDENTIAL_SHAPES:
        if pattern.search(text):
            return kind
    return None


def _redact_pairs(text: str, is_secret_name: Callable[[str], bool]) -> str:
    """Redact the values of ``name: value`` pairs whose name is secret."""
    # Indices must line up with `text`: lower() may change the length of non-ASCII text.
    lower = (
        text.lower() if text.isascii() else "".join(c.lower() if c.isascii() else c for c in text)
    )
    starts: set[int] = set()
    for trigger in TRIGGERS:
        index = lower.find(trigger)
        while index >= 0:
            start = index
            while start > 0 and text[start - 1] in _NAME_CHARS:
                start -= 1
            starts.add(start)
            index = lower.find(trigger, index + len(trigger))
    pieces: list[str] = []
    done = 0  # text[:done] is settled
    for start in sorted(starts):
        if start < done:
            continue  # inside a value already redacted
        match = _PAIR_AT.match(text, start)
        if match is None or not is_secret_name(match["name"]):
            continue
        if start > 0 and text[start - 1] == "/" and text[match.end("name")] in "\"'":
            # The end of a quoted path ("cannot access '/var/run/secrets': No such file"),
            # not a quoted name.
            continue
        value_start, value_end = match.span("value")
        value = match["value"]
        if value[0] in "\"'":
            closed = len(value) > 1 and value[-1] == value[0]
            redacted = f"{value[0]}{REDACTED}{value[0] if closed else ''}"
        elif ":" in match["sep"] and match["name"].lower().endswith(("authorization", "cookie")):
            line_end = _HEADER_VALUE_END.search(text, value_start)
            value_end = line_end.start() if line_end is not None else len(text)
            redacted = REDACTED
        elif value.lower() in _JSON_LITERALS:
            continue  # null / true / false reveal nothing, and JSON must stay valid
        elif text.startswith('"', match.end("name")):
            # A quoted name: this is JSON, so the redacted value must be a JSON string.
            redacted = f'"{REDACTED}"'
        else:
            scheme, *rest = value.split(None, 1)  # "Bearer x" keeps its scheme
            redacted = f"{scheme} {REDACTED}" if rest else REDACTED
        pieces += (text[done:value_start], redacted)
        done = value_end
    if not pieces:
        return text
    pieces.append(text[done:])
    return "".join(pieces)


def _redact_url_credentials(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***REDACTED***@host``."""
    pieces: list[str] = []
    done = 0
    index = text.find("://")
    while index >= 0:
        match = _URL_CREDENTIALS_AT.match(text, index + 3)
        if match is not None and index > 0 and text[index - 1].isalnum():
            password_start, password_end = match.span("password")
            pieces += (text[done:password_start], REDACTED)
            done = password_end
            index = text.find("://", match.end())
        else:
            index = text.find("://", index + 3)
    if not pieces:
        return text
    pieces.append(text[done:])
    return "".join(pieces)


def literal_regex(literals: Iterable[str]) -> re.Pattern[str]:
    """One regex matching any of ``literals``, longest match first, shaped as a prefix trie.

    A trie lets the regex engine reject most positions on the first character instead of
    trying every literal in turn; the optional tail after a complete literal is greedy, so
    "abcd1234" wins over its prefix "abcd". Unbranched runs are emitted in a loop, so only
    branch points recurse; pathological sets fall back to a plain longest-first alternation.
    """
    ordered = sorted(literals, key=lambda v: (-len(v), v))
    trie: dict[str, Any] = {}
    for literal in ordered:
        node = trie
        for char in literal:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        run: list[str] = []
        while len(node) == 1 and "" not in node:  # a single-child chain needs no group
            ((char, node),) = node.items()
            run.append(re.escape(char))
        branches = [re.escape(char) + build(child) for char, child in sorted(node.items()) if char]
        tail = ""
        if branches:
            body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
            tail = f"(?:{body})?" if "" in node else body
        return "".join(run) + tail

    try:
        return re.compile(build(trie))
    except RecursionError:  # thousands of literals, each a prefix of the next
        return re.compile("|".join(map(re.escape, ordered)))
