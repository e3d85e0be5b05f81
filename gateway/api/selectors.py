"""flespi's item selectors, as the platform API reads them from a path segment.

- `all`: every item of the collection;
- `1,2,3`: these ids (a repeated id is taken once, the first place it appears keeps its order);
- `info=my*`: items whose field matches a `*`/`?` wildcard pattern (dotted names reach inside
  objects: `metadata.owner=bob`, `access.type=2`);
- `{enabled==false && ttl>3600}`: items for which the expression holds;
- any of these followed by `,cid=N`: only the items whose `cid` is N (the caller checks that N is
  the acting account or below it).

Expressions are parsed here into closures, never evaluated as code: operators `==`, `!=`, `<`,
`<=`, `>`, `>=`, `&&`, `||`, `!`, parentheses; literals are numbers, quoted strings, `true`,
`false` and `null`; a bare name is a field of the item. Comparing values of different kinds is
false (`!=` true), never an error. Every malformed selector is an `InvalidInput` naming `selector`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.errors import FieldProblem, InvalidInput
from gateway.policy.wildcard import glob_to_regex

Record = Mapping[str, Any]
Predicate = Callable[[Record], bool]
Value = Callable[[Record], Any]

MAX_SELECTOR = 2048  # characters; a selector is a path segment, never a document
MAX_DEPTH = 32  # nested parentheses and `!`: the parser recurses once per level
MAX_ID_DIGITS = 15  # ids stay below 10**15: exact as JSON numbers everywhere (2**53)
_ID = re.compile(rf"[0-9]{{1,{MAX_ID_DIGITS}}}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*")
_TOKEN = re.compile(r"""
    \s*(?:
      (?P<number>-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<op>==|!=|<=|>=|&&|\|\||[<>!()])
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
    )""", re.VERBOSE)
_MAX_NUMBER_CHARS = 32  # `1` followed by thousands of digits is refused, not converted
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "t": "\t", "/": "/"}


@dataclass(frozen=True, slots=True)
class Selector:
    """What a selector asks for: an id list (`ids`), or a test on each item (`match`), or all;
    and optionally one account (`cid`)."""

    ids: tuple[int, ...] | None = None
    match: Predicate | None = None
    cid: int | None = None

    def accepts(self, record: Record) -> bool:
        if self.cid is not None and _as_int(record.get("cid")) != self.cid:
            return False
        if self.ids is not None and _as_int(record.get("id")) not in self.ids:
            return False
        return self.match is None or self.match(record)


ALL = Selector()


def bad_selector(text: str, why: str) -> InvalidInput:
    shown = text if len(text) <= 64 else text[:61] + "..."
    return InvalidInput([FieldProblem("selector", f"invalid selector '{shown}': {why}")])


def parse_selector(text: str | None, fields: frozenset[str]) -> Selector:
    """The selector of a path segment; `fields`: the names an item of the collection has."""
    if text is None or text == "all":
        return ALL
    if len(text) > MAX_SELECTOR:
        raise bad_selector(text, f"longer than {MAX_SELECTOR} characters")
    base, cid = _split_cid(text)
    if base == "all":
        return Selector(cid=cid)
    if base.startswith("{"):
        if not base.endswith("}") or len(base) < 3:
            raise bad_selector(text, "an expression selector is {expression}")
        return Selector(match=parse_expression(base[1:-1], fields, text), cid=cid)
    if "=" in base:
        return Selector(match=_field_pattern(base, fields, text), cid=cid)
    return Selector(ids=_ids(base, text), cid=cid)


def _split_cid(text: str) -> tuple[str, int | None]:
    """`...,cid=N` -> (`...`, N); a bare `cid=N` stands for `all,cid=N`."""
    if text.startswith("{"):
        end = text.rfind("}")  # braces may occur in the expression's strings, never after it
        if end < 0:
            raise bad_selector(text, "an expression selector is {expression}")
        base, rest = text[:end + 1], text[end + 1:]
        if rest and (not rest.startswith(",") or rest == ","):
            raise bad_selector(text, "only ',cid=N' may follow the expression")
        rest = rest[1:]
    elif text.startswith("cid=") and "," not in text:
        base, rest = "all", text
    else:
        head, comma, last = text.rpartition(",")
        base, rest = (head, last) if comma and last.startswith("cid=") else (text, "")
    if not rest:
        return base, None
    if not rest.startswith("cid="):
        raise bad_selector(text, "only ',cid=N' may follow the selector")
    value = rest[len("cid="):]
    if not _ID.fullmatch(value):
        raise bad_selector(text, "'cid' must be an account id")
    if not base:
        raise bad_selector(text, "nothing before ',cid='")
    return base, int(value)


def _ids(base: str, text: str) -> tuple[int, ...]:
    seen: dict[int, None] = {}
    for part in base.split(","):
        if not _ID.fullmatch(part) or int(part) < 1:
            raise bad_selector(text, "use all, ids like 1,2, field=pattern or {expression}")
        seen.setdefault(int(part), None)
    return tuple(seen)


def _field_pattern(base: str, fields: frozenset[str], text: str) -> Predicate:
    name, _, pattern = base.partition("=")
    _check_name(name, fields, text)
    if not pattern:
        raise bad_selector(text, f"no pattern after '{name}='")
    if "," in pattern:  # `a=x,b=y` or `a=x,1`: flespi's field selector is one field, one pattern
        raise bad_selector(text, "a field selector is one field=pattern (use {expression} to combine)")
    regex = re.compile(glob_to_regex(pattern, ".", "."), re.DOTALL)
    read = _reader(name)

    def matches(record: Record) -> bool:
        value = read(record)
        return value is not None and not isinstance(value, (dict, list)) and regex.fullmatch(_text(value)) is not None
    return matches


def _check_name(name: str, fields: frozenset[str], text: str) -> None:
    if not _NAME.fullmatch(name):
        raise bad_selector(text, f"'{name}' is not a field name")
    if name.split(".", 1)[0] not in fields:
        raise bad_selector(text, f"unknown field '{name.split('.', 1)[0]}'; one of {', '.join(sorted(fields))}")


def _reader(name: str) -> Value:
    parts = name.split(".")

    def read(record: Record) -> Any:
        value: Any = record
        for part in parts:
            if not isinstance(value, Mapping):
                return None
            value = value.get(part)
        return value
    return read


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- expressions ------------------------------------------------------------------------------

@dataclass(slots=True)
class _Lexeme:
    kind: str  # number, string, op, name
    text: str


def _lex(source: str, text: str) -> list[_Lexeme]:
    lexemes: list[_Lexeme] = []
    at = 0
    while at < len(source):
        if source[at:].strip() == "":
            break
        match = _TOKEN.match(source, at)
        if match is None or match.end() == at:
            raise bad_selector(text, f"unexpected character {source[at:].lstrip()[:1]!r} in the expression")
        kind = match.lastgroup or ""
        lexemes.append(_Lexeme(kind, match.group(kind)))
        at = match.end()
    return lexemes


class _Parser:
    """expr := or; or := and ('||' and)*; and := not ('&&' not)*; not := '!' not | cmp;
    cmp := operand (op operand)?; operand := literal | name | '(' expr ')'."""

    def __init__(self, lexemes: list[_Lexeme], fields: frozenset[str], text: str) -> None:
        self.lexemes = lexemes
        self.at = 0
        self.fields = fields
        self.text = text
        self.depth = 0

    def fail(self, why: str) -> InvalidInput:
        return bad_selector(self.text, why)

    def peek(self) -> _Lexeme | None:
        return self.lexemes[self.at] if self.at < len(self.lexemes) else None

    def take_op(self, *ops: str) -> str | None:
        lexeme = self.peek()
        if lexeme is not None and lexeme.kind == "op" and lexeme.text in ops:
            self.at += 1
            return lexeme.text
        return None

    def parse(self) -> Predicate:
        if not self.lexemes:
            raise self.fail("empty expression")
        predicate = self.or_()
        if self.peek() is not None:
            raise self.fail(f"unexpected '{self.lexemes[self.at].text}' in the expression")
        return predicate

    def or_(self) -> Predicate:
        terms = [self.and_()]
        while self.take_op("||"):
            terms.append(self.and_())
        if len(terms) == 1:
            return terms[0]
        return lambda record: any(term(record) for term in terms)

    def and_(self) -> Predicate:
        terms = [self.not_()]
        while self.take_op("&&"):
            terms.append(self.not_())
        if len(terms) == 1:
            return terms[0]
        return lambda record: all(term(record) for term in terms)

    def not_(self) -> Predicate:
        if self.take_op("!"):
            inner = self.nested(self.not_)
            return lambda record: not inner(record)
        return self.comparison()

    def nested(self, parse: Callable[[], Predicate]) -> Predicate:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH} levels")
        try:
            return parse()
        finally:
            self.depth -= 1

    def comparison(self) -> Predicate:
        if self.take_op("("):
            inner = self.nested(self.or_)
            if not self.take_op(")"):
                raise self.fail("missing ')'")
            left: Value | Predicate = inner
        else:
            left = self.operand()
        op = self.take_op("==", "!=", "<", "<=", ">", ">=")
        if op is None:
            return lambda record: _truthy(left(record))
        right = self.operand()
        return _compare(op, left, right)

    def operand(self) -> Value:
        lexeme = self.peek()
        if lexeme is None:
            raise self.fail("the expression ends too early")
        if lexeme.kind == "op" and lexeme.text == "(":
            self.at += 1
            inner = self.nested(self.or_)
            if not self.take_op(")"):
                raise self.fail("missing ')'")
            return inner
        self.at += 1
        if lexeme.kind == "number":
            constant = self.number(lexeme.text)
            return lambda record: constant
        if lexeme.kind == "string":
            string = self.string(lexeme.text)
            return lambda record: string
        if lexeme.kind == "name":
            if lexeme.text in ("true", "false", "null"):
                literal = {"true": True, "false": False, "null": None}[lexeme.text]
                return lambda record: literal
            _check_name(lexeme.text, self.fields, self.text)
            return _reader(lexeme.text)
        raise self.fail(f"unexpected '{lexeme.text}' in the expression")

    def number(self, text: str) -> int | float:
        if len(text) > _MAX_NUMBER_CHARS:
            raise self.fail(f"number longer than {_MAX_NUMBER_CHARS} characters")
        if re.fullmatch(r"-?[0-9]+", text):
            return int(text)
        value = float(text)
        if value != value or value in (float("inf"), float("-inf")):
            raise self.fail(f"number {text} out of range")
        return value

    def string(self, quoted: str) -> str:
        out: list[str] = []
        body = iter(quoted[1:-1])
        for char in body:
            if char == "\\":
                escaped = next(body, "")
                if escaped not in _ESCAPES:
                    raise self.fail(f"unknown escape '\\{escaped}' in a string")
                out.append(_ESCAPES[escaped])
            else:
                out.append(char)
        return "".join(out)


def parse_expression(source: str, fields: frozenset[str], text: str | None = None) -> Predicate:
    """The predicate an expression (without its braces) stands for."""
    shown = text if text is not None else "{" + source + "}"
    return _Parser(_lex(source, shown), fields, shown).parse()


def _truthy(value: Any) -> bool:
    return value is not None and value is not False and value != 0 and value != "" and value != {} and value != []


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "other"


def _compare(op: str, left: Value, right: Value) -> Predicate:
    def holds(record: Record) -> bool:
        a, b = left(record), right(record)
        same = _kind(a) == _kind(b)
        if op == "==":
            return same and a == b
        if op == "!=":
            return not (same and a == b)
        if not same or _kind(a) not in ("number", "string"):
            return False
        if op == "<":
            return bool(a < b)
        if op == "<=":
            return bool(a <= b)
        if op == ">":
            return bool(a > b)
        return bool(a >= b)
    return holds
