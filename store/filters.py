"""containerd's filter language (``filters/`` in containerd 1.6), parsed and matched.

A filter string is selectors joined by ``,`` (all must match); several filter strings
match when any does; no strings, or one empty string, match everything. A selector is a
fieldpath alone (presence) or ``fieldpath op value`` with op ``==``, ``!=`` or ``~=``.
Fields are runs of ``[A-Za-z0-9_]`` or double-quoted Go string literals, joined by ``.``.
Values are bare runs up to ``,`` or whitespace, or quoted; ``/.../`` and ``|...|`` quotes
are allowed only after ``~=``. ``!=`` and ``~=`` see an absent field as the empty string;
``~=`` takes Go RE2 syntax (see ``go_regex``), unanchored; a regex that does not compile
is not a parse error: it matches nothing (containerd 1.6, verified), unless the caller
asks for ``strict`` parsing (the CLI), which refuses it like a syntax error.

Parse errors raise InvalidArgument with the bad character marked: ``[ab >|=|< c]``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence

from .errors import InvalidArgument

__all__ = ["Adaptor", "Filter", "go_regex", "parse_filters"]

log = logging.getLogger(__name__)

#: Looks a fieldpath up on an item: returns (value, present).
Adaptor = Callable[[Sequence[str]], "tuple[str, bool]"]

_EOF = "EOF"
_QUOTED = "quoted"
_VALUE = "value"
_FIELD = "field"
_SEP = "separator"
_OP = "operator"
_ILLEGAL = "illegal"

_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


def _is_field_char(c: str) -> bool:
    """ASCII letters, digits and ``_`` (not ``-``: ``labels.my-key`` is a parse error in
    containerd; such keys are written ``labels."my-key"``)."""
    return c == "_" or ("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9")


def _is_value_char(c: str) -> bool:
    return c != "," and not c.isspace() and c.isprintable()


class _ParseError(Exception):
    def __init__(self, text: str, pos: int, msg: str) -> None:
        if pos < len(text):
            where = f"[{text[:pos]} >|{text[pos]}|< {text[pos + 1:]}]"
        else:
            where = f"[{text}]"
        super().__init__(f"filters: parse error: {where}: {msg}")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.value_mode = False
        self.err = ""

    def peek_char(self) -> str:
        """The next raw character ('' at the end), without consuming it. Like
        containerd's peek it does not skip whitespace, so whitespace is ignored before
        a token the parser scans (``a == b``) but not where it peeks: before ``,`` or the
        end after a selector, or before ``.`` in a fieldpath (``a ,b`` and ``a .b`` are
        errors in containerd too)."""
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def scan(self) -> tuple[int, str, str]:
        text = self.text
        while self.pos < len(text) and text[self.pos].isspace():
            self.pos += 1
        start = self.pos
        if start >= len(text):
            return start, _EOF, ""
        c = text[start]
        self.pos += 1
        if c == "\0":
            self.err = "unexpected null"
            return start, _ILLEGAL, c
        if c in '"/|':
            ok = self._scan_quoted(c)
            return start, (_QUOTED if ok else _ILLEGAL), text[start : self.pos]
        if c in ",.":
            self.value_mode = False
            return start, _SEP, c
        if c in "=!~":
            while self.pos < len(text) and text[self.pos] in "=!~":
                self.pos += 1
            self.value_mode = True
            return start, _OP, text[start : self.pos]
        if self.value_mode:
            while self.pos < len(text) and _is_value_char(text[self.pos]):
                self.pos += 1
            self.value_mode = False
            return start, _VALUE, text[start : self.pos]
        if _is_field_char(c):
            while self.pos < len(text) and _is_field_char(text[self.pos]):
                self.pos += 1
            return start, _FIELD, text[start : self.pos]
        return start, _ILLEGAL, c

    def _scan_quoted(self, quote: str) -> bool:
        text = self.text
        while True:
            if self.pos >= len(text) or text[self.pos] == "\n":
                self.err = "quoted literal not terminated"
                return False
            c = text[self.pos]
            self.pos += 1
            if c == quote:
                return True
            if c == "\\":
                if self.pos >= len(text):
                    self.err = "quoted literal not terminated"
                    return False
                self.pos += 1  # validity of the escape is checked when unquoting


def _unquote(lit: str) -> str:
    """Decode a quoted literal with Go escapes; the quote character is lit[0]."""
    quote, body = lit[0], lit[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        i += 1
        e = body[i] if i < len(body) else ""
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 1
        elif e == quote:
            out.append(quote)
            i += 1
        elif e in "01234567" and e:
            digits = body[i : i + 3]
            if len(digits) != 3 or any(d not in "01234567" for d in digits):
                raise ValueError("illegal numeric escape sequence")
            out.append(chr(int(digits, 8)))
            i += 3
        elif e in ("x", "u", "U"):
            n = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i + 1 : i + 1 + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise ValueError("illegal numeric escape sequence")
            out.append(chr(int(digits, 16)))
            i += 1 + n
        else:
            raise ValueError("illegal escape sequence")
    return "".join(out)


_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "ascii": "\\x00-\\x7f", "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f", "digit": "0-9", "graph": "!-~", "lower": "a-z",
    "print": " -~", "punct": "!-/:-@\\[-`{-~", "space": "\\t\\n\\v\\f\\r ", "upper": "A-Z",
    "word": "0-9A-Za-z_", "xdigit": "0-9A-Fa-f",
}
#: Group openers Python accepts and Go's RE2 rejects: lookaround, atomic groups,
#: conditionals, named backreferences, comments.
_NOT_RE2 = ("(?=", "(?!", "(?<=", "(?<!", "(?>", "(?(", "(?P=", "(?#")


def go_regex(pattern: str) -> str | None:
    """Translate a Go (RE2) regular expression to Python's ``re`` syntax (to be compiled
    with ``re.ASCII``, as RE2's ``\\d \\w \\s \\b`` are ASCII), or None when RE2 would reject
    it, so that it matches nothing as in containerd. Handles ``\\z``, ``\\Q...\\E`` and
    ``[[:alpha:]]`` classes, and refuses backreferences, lookaround, atomic groups and
    possessive quantifiers; Unicode classes (``\\pL``) are not translated."""
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        c = pattern[i]
        if c == "\\":
            e = pattern[i + 1 : i + 2]
            if e == "" or e in "123456789" or e in "Zg":
                return None
            if e == "z":
                out.append("\\Z")
            elif e == "Q" and not in_class:
                end = pattern.find("\\E", i + 2)
                literal = pattern[i + 2 :] if end < 0 else pattern[i + 2 : end]
                out.append(re.escape(literal))
                i = n if end < 0 else end + 2
                continue
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            if pattern.startswith("[:", i):
                end = pattern.find(":]", i + 2)
                name = pattern[i + 2 : end] if end > 0 else ""
                if name in _POSIX_CLASSES:
                    out.append(_POSIX_CLASSES[name])
                    i = end + 2
                    continue
            if c == "[":
                out.append("\\[")  # literal in RE2; Python may read it as a nested set
                i += 1
                continue
            in_class = c != "]"
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):  # a leading ] is a literal member
                out.append("\\]")
                i += 1
            continue
        if c == "(" and pattern.startswith(_NOT_RE2, i):
            return None
        if c == "+" and out and out[-1] in ("*", "+", "?", "}"):
            return None  # possessive quantifier
        out.append(c)
        i += 1
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class _Selector:
    fieldpath: tuple[str, ...]
    op: str  # "", "==", "!=", "~="
    value: str = ""
    regex: re.Pattern[str] | None = None
    # a ~= pattern that does not compile: (position in the filter text, reason)
    bad_regex: tuple[int, str] | None = None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.op == "":
            return present
        if self.op == "==":
            return present and value == self.value
        if self.op == "!=":
            return value != self.value
        if self.regex is None:
            return False  # (logged once, when parsed)
        return self.regex.search(value) is not None


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.s = _Scanner(text)

    def fail(self, pos: int, msg: str) -> _ParseError:
        return _ParseError(self.text, pos, msg)

    def selectors(self) -> list[_Selector]:
        out = [self.selector()]
        while True:
            nxt = self.s.peek_char()
            if nxt == "":
                return out
            if nxt != ",":
                raise self.fail(self.s.pos, f"unexpected input: {nxt}")
            self.s.scan()
            out.append(self.selector())

    def selector(self) -> _Selector:
        fieldpath = self.fieldpath()
        if self.s.peek_char() in ("", ","):
            return _Selector(fieldpath, "")
        op = self.operator()
        start = self.s.pos
        value = self.value(allow_alt_quotes=op == "~=")
        if op != "~=":
            return _Selector(fieldpath, op, value)
        while start < len(self.text) and self.text[start].isspace():
            start += 1  # where the value begins
        bare = self.text[start:self.s.pos] == value
        translated = go_regex(value)
        if translated is None:
            return _Selector(fieldpath, op, value, None, (start, "not an RE2 regular expression"
                                                          " (backreference, lookaround, ...)"))
        try:
            return _Selector(fieldpath, op, value, re.compile(translated, re.ASCII))
        except re.error as exc:
            where = start + exc.pos if bare and translated == value and exc.pos else start
            return _Selector(fieldpath, op, value, None, (where, exc.msg))

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while self.s.peek_char() == ".":
            self.s.scan()
            fields.append(self.field())
        return tuple(fields)

    def field(self) -> str:
        pos, tok, text = self.s.scan()
        if tok == _FIELD:
            return text
        if tok == _QUOTED:
            return self.unquote(pos, text, allow_alt_quotes=False)
        if tok == _ILLEGAL and self.s.err:
            raise self.fail(pos, self.s.err)
        raise self.fail(pos, "expected field or quoted")

    def operator(self) -> str:
        pos, tok, text = self.s.scan()
        if tok != _OP:
            raise self.fail(pos, 'expected an operator ("=="|"!="|"~=")')
        if text not in ("==", "!=", "~="):
            raise self.fail(pos, f"unsupported operator {text!r}")
        return text

    def value(self, *, allow_alt_quotes: bool) -> str:
        pos, tok, text = self.s.scan()
        if tok in (_VALUE, _FIELD):
            return text
        if tok == _QUOTED:
            return self.unquote(pos, text, allow_alt_quotes=allow_alt_quotes)
        if tok == _ILLEGAL and self.s.err:
            raise self.fail(pos, self.s.err)
        if tok == _EOF:
            raise self.fail(pos, "unexpected end of input, expected value or quoted")
        raise self.fail(pos, "expected value or quoted")

    def unquote(self, pos: int, text: str, *, allow_alt_quotes: bool) -> str:
        if not allow_alt_quotes and text[0] != '"':
            raise self.fail(pos, "invalid quote encountered")
        try:
            return _unquote(text)
        except ValueError as exc:
            raise self.fail(pos, f"unquoting failed: {exc}") from None


@dataclasses.dataclass(frozen=True)
class Filter:
    """Parsed filter strings: ``match(adaptor)`` is true when any string matches."""

    alternatives: tuple[tuple[_Selector, ...], ...]

    def match(self, adaptor: Adaptor) -> bool:
        if not self.alternatives:
            return True
        return any(all(sel.match(adaptor) for sel in alt) for alt in self.alternatives)


def parse_filters(*filters: str, strict: bool = False) -> Filter:
    """Parse containerd filter strings; raise InvalidArgument on a syntax error, and with
    ``strict`` also for a ``~=`` regex that does not compile (the message marks the bad
    character as for syntax errors). Otherwise such a regex matches nothing, as in
    containerd, and is logged once here."""
    alts: list[tuple[_Selector, ...]] = []
    for text in filters:
        if text == "":
            return Filter(())  # an empty filter string matches everything
        try:
            selectors = tuple(_Parser(text).selectors())
        except _ParseError as exc:
            raise InvalidArgument(str(exc)) from None
        for sel in selectors:
            if sel.bad_regex is None:
                continue
            pos, why = sel.bad_regex
            if strict:
                raise InvalidArgument(f"{_ParseError(text, pos, 'regex does not compile: ' + why)}")
            log.warning("filter regex %r does not compile (%s); it matches nothing",
                        sel.value, why)
        alts.append(selectors)
    return Filter(tuple(alts))
