"""PEFT's ``rank_pattern`` / ``alpha_pattern`` matching, with PEFT's answers and a bounded cost.

PEFT gives module ``key`` the value of the first pattern ``p`` for which
``re.match(rf"(.*\\.)?({p})$", key)`` succeeds. Python's ``re`` backtracks: a pattern such as
``(a+)+b`` takes exponential time on a long module name, and a config file is not trusted input.
So the same regular expression is parsed with Python's own parser (``re._parser``: the syntax is
exactly ``re``'s) and run by a Thompson simulation instead (the set of NFA states alive at each
position of the key), whose cost is at most (key length + 1) x (number of states).

For the constructs it runs, the answer is ``re``'s: for a pattern without backreferences or atomic
groups, a backtracking matcher finds a match exactly when one exists, and whether one exists is
what the simulation decides. Constructs whose meaning depends on backtracking order or that it
does not model (backreferences, conditionals, atomic groups and possessive repeats,
case-insensitive or locale matching) are refused with a message, as are patterns whose state
count or total work is over the limits below. A pattern that is a plain module name (no regex
syntax at all, PEFT's own ``rank_pattern`` output) is compared as a string.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

# Python's own regular expression parser (``sre_parse`` before 3.11): a pattern means here
# exactly what it means to ``re``.
if sys.version_info >= (3, 11):
    from re import _constants, _parser
else:  # pragma: no cover - Python 3.10
    import sre_constants as _constants
    import sre_parse as _parser

#: Longest pattern accepted (a module name is at most 1024 characters, like any tensor name).
MAX_PATTERN_CHARS = 2048
#: Most NFA states one pattern may compile to (counted repeats are unrolled: ``a{500}`` is 500).
MAX_STATES = 20_000
#: Most state visits the matching of one adapter's modules may take, all patterns together
#: (a few seconds at worst; PEFT's own patterns, plain names, take none).
MAX_STEPS = 20_000_000

_UNBOUNDED = _constants.MAXREPEAT
_SUPPORTED_FLAGS = re.ASCII | re.DOTALL | re.MULTILINE | re.VERBOSE | re.UNICODE
_ASCII_SPACE = frozenset(" \t\n\r\x0b\x0c")


class PatternError(ValueError):
    """A pattern unipack does not evaluate; the message says why (no file name: the caller's).
    ``pattern`` is the refused pattern, where one is to blame."""

    pattern: str | None = None


class Budget:
    """State visits left for one adapter's matching (all its patterns and modules together)."""

    def __init__(self, steps: int = MAX_STEPS) -> None:
        self.steps = steps

    def spend(self, n: int) -> None:
        self.steps -= n
        if self.steps < 0:
            raise PatternError(f"takes over {MAX_STEPS:,} steps to match against the module names")


# -- compiled form ---------------------------------------------------------------------------------

#: A test on one character.
CharTest = Callable[[str], bool]
#: A test on a position of the key (anchors, word boundaries, lookarounds).
PosTest = Callable[[str, int], bool]


@dataclass
class _State:
    kind: str  # "char" | "split" | "assert" | "match"
    test: Any = None  # CharTest for "char", PosTest for "assert"
    out: list[int] = field(default_factory=list)  # next states (two for a split)


class _Nfa:
    """States of one (sub)pattern; ``start`` reaches the ``match`` state on a match."""

    def __init__(self, counter: list[int], budget: Budget) -> None:
        self.states: list[_State] = []
        self.start = -1
        self.counter, self.budget = counter, budget  # shared by a pattern and its lookarounds

    def add(self, kind: str, test: Any = None, out: Iterable[int] = ()) -> int:
        self.counter[0] += 1
        if self.counter[0] > MAX_STATES:
            raise PatternError(f"compiles to over {MAX_STATES:,} states (a large counted repeat?)")
        self.states.append(_State(kind, test, list(out)))
        return len(self.states) - 1

    def ends(self, text: str, start: int, *, first: bool = False) -> set[int]:
        """The positions at which a match beginning at ``start`` can end (with ``first``: the
        first one found, enough to know that there is a match)."""
        found: set[int] = set()
        states = self.states
        current = self._closure([self.start], text, start)
        pos = start
        while True:
            if any(states[s].kind == "match" for s in current):
                found.add(pos)
                if first:
                    return found
            if pos == len(text) or not current:
                return found
            ch = text[pos]
            moved = [states[s].out[0] for s in current if states[s].kind == "char" and states[s].test(ch)]
            pos += 1
            current = self._closure(moved, text, pos)

    def _closure(self, seeds: list[int], text: str, pos: int) -> list[int]:
        """The states reachable from ``seeds`` without consuming a character, at ``pos``."""
        seen: set[int] = set()
        stack = list(reversed(seeds))
        alive: list[int] = []
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            state = self.states[s]
            if state.kind == "split":
                stack.extend(reversed(state.out))
            elif state.kind == "assert":
                if state.test(text, pos):
                    stack.append(state.out[0])
            else:
                alive.append(s)
        self.budget.spend(len(seen) + 1)
        return alive


class _Compiler:
    """Parsed ``re`` syntax -> an ``_Nfa``, continuation-passing: each node is compiled knowing
    the state that follows it, so only loop entries are patched afterwards."""

    def __init__(self, nfa: _Nfa) -> None:
        self.nfa = nfa

    def sequence(self, items: list[tuple[Any, Any]], flags: int, nxt: int) -> int:
        for op, av in reversed(items):
            nxt = self.node(str(op), av, flags, nxt)
        return nxt

    def node(self, op: str, av: Any, flags: int, nxt: int) -> int:
        nfa = self.nfa
        if op == "LITERAL":
            return nfa.add("char", _literal(av), [nxt])
        if op == "NOT_LITERAL":
            return nfa.add("char", _not_literal(av), [nxt])
        if op == "ANY":
            dotall = bool(flags & re.DOTALL)
            return nfa.add("char", (lambda c: True) if dotall else (lambda c: c != "\n"), [nxt])
        if op == "IN":
            return nfa.add("char", _charset(av, flags), [nxt])
        if op == "AT":
            return nfa.add("assert", _anchor(str(av), flags), [nxt])
        if op == "BRANCH":
            starts = [self.sequence(list(alt), flags, nxt) for alt in av[1]]
            entry = starts[-1]
            for s in reversed(starts[:-1]):
                entry = nfa.add("split", None, [s, entry])
            return entry
        if op == "SUBPATTERN":
            _group, add_flags, del_flags, sub = av
            return self.sequence(list(sub), _flags((flags | add_flags) & ~del_flags), nxt)
        if op in ("MAX_REPEAT", "MIN_REPEAT"):  # greedy or lazy: the same set of matches
            low, high, sub = av
            return self._repeat(int(low), int(high), list(sub), flags, nxt)
        if op in ("ASSERT", "ASSERT_NOT"):
            direction, sub = av
            return nfa.add("assert", self._lookaround(direction, sub, flags, op == "ASSERT_NOT"), [nxt])
        raise PatternError(f"uses {_FEATURES.get(op, op)}, which unipack does not evaluate")

    def _repeat(self, low: int, high: int, sub: list[tuple[Any, Any]], flags: int, nxt: int) -> int:
        nfa = self.nfa
        if high == _UNBOUNDED:
            # The loop's entry: one more pass through ``sub`` (which leads back here), or on.
            entry = nfa.add("split", None, [])
            nfa.states[entry].out = [self.sequence(sub, flags, entry), nxt]
        else:
            # Up to high - low optional passes, innermost first: each may stop and go on to nxt.
            entry = nxt
            for _ in range(high - low):
                entry = nfa.add("split", None, [self.sequence(sub, flags, entry), nxt])
        for _ in range(low):  # the passes that must happen (unrolled: bounded by MAX_STATES)
            entry = self.sequence(sub, flags, entry)
        return entry

    def _lookaround(self, direction: int, sub: Any, flags: int, negate: bool) -> PosTest:
        inner = _Nfa(self.nfa.counter, self.nfa.budget)
        inner.start = _Compiler(inner).sequence(list(sub), flags, inner.add("match"))
        width = 0
        if direction < 0:
            low, high = sub.getwidth()
            if low != high:  # re refuses this itself; kept for a clear message
                raise PatternError("has a look-behind of variable width")
            width = low
        cache: dict[int, bool] = {}
        cached_text: list[str | None] = [None]

        def test(text: str, pos: int) -> bool:
            if cached_text[0] is not text:  # one key at a time: the cache never outgrows it
                cache.clear()
                cached_text[0] = text
            if pos not in cache:
                if direction < 0:
                    begin = pos - width
                    hit = begin >= 0 and pos in inner.ends(text, begin)
                else:
                    hit = bool(inner.ends(text, pos, first=True))
                cache[pos] = hit != negate
            return cache[pos]

        return test


_FEATURES = {
    "GROUPREF": "a backreference",
    "GROUPREF_EXISTS": "a conditional group",
    "ATOMIC_GROUP": "an atomic group",
    "POSSESSIVE_REPEAT": "a possessive repeat",
}


def _flags(flags: int) -> int:
    if flags & (re.IGNORECASE | re.LOCALE):
        raise PatternError("uses case-insensitive or locale matching ((?i), (?L)), which unipack does not evaluate")
    if flags & ~_SUPPORTED_FLAGS:
        raise PatternError(f"uses regular expression flags {flags:#x}, which unipack does not evaluate")
    return flags


def _literal(code: int) -> CharTest:
    ch = chr(code)
    return lambda c: c == ch


def _not_literal(code: int) -> CharTest:
    ch = chr(code)
    return lambda c: c != ch


def _is_word(c: str, flags: int) -> bool:
    if flags & re.ASCII:
        return c < "\x80" and (c.isalnum() or c == "_")
    return c.isalnum() or c == "_"


def _category(name: str, flags: int) -> CharTest:
    """``\\d``, ``\\s``, ``\\w`` and their negations, as ``re`` defines them (str patterns)."""
    ascii_only = bool(flags & re.ASCII)
    tests: dict[str, CharTest] = {
        "DIGIT": (lambda c: "0" <= c <= "9") if ascii_only else str.isdecimal,
        "SPACE": (lambda c: c in _ASCII_SPACE) if ascii_only else str.isspace,
        "WORD": lambda c: _is_word(c, flags),
    }
    negated = name.startswith("CATEGORY_NOT_")
    base = tests.get(name.removeprefix("CATEGORY_NOT_" if negated else "CATEGORY_"))
    if base is None:
        raise PatternError(f"uses the character class {name}, which unipack does not evaluate")
    if negated:
        return lambda c: not base(c)
    return base


def _charset(items: list[tuple[Any, Any]], flags: int) -> CharTest:
    negate = False
    chars: set[str] = set()
    ranges: list[tuple[str, str]] = []
    categories: list[CharTest] = []
    for op, av in items:
        kind = str(op)
        if kind == "NEGATE":
            negate = True
        elif kind == "LITERAL":
            chars.add(chr(av))
        elif kind == "RANGE":
            ranges.append((chr(av[0]), chr(av[1])))
        elif kind == "CATEGORY":
            categories.append(_category(str(av), flags))
        else:
            raise PatternError(f"uses {kind} in a character set, which unipack does not evaluate")

    def test(c: str) -> bool:
        hit = c in chars or any(lo <= c <= hi for lo, hi in ranges) or any(t(c) for t in categories)
        return hit != negate

    return test


def _anchor(code: str, flags: int) -> PosTest:
    multiline = bool(flags & re.MULTILINE)
    if code == "AT_BEGINNING" and multiline:
        return lambda t, i: i == 0 or t[i - 1] == "\n"
    if code in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
        return lambda t, i: i == 0
    if code == "AT_END" and multiline:
        return lambda t, i: i == len(t) or t[i] == "\n"
    if code == "AT_END":  # "$": the end, or just before a newline that ends the string
        return lambda t, i: i == len(t) or (i == len(t) - 1 and t[i] == "\n")
    if code == "AT_END_STRING":
        return lambda t, i: i == len(t)
    if code in ("AT_BOUNDARY", "AT_NON_BOUNDARY"):
        want = code == "AT_BOUNDARY"

        def boundary(t: str, i: int) -> bool:
            if not t:  # as in re: an empty string has neither a boundary nor a non-boundary
                return False
            before = i > 0 and _is_word(t[i - 1], flags)
            after = i < len(t) and _is_word(t[i], flags)
            return (before != after) == want

        return boundary
    raise PatternError(f"uses the anchor {code}, which unipack does not evaluate")


# -- PEFT's lookup ---------------------------------------------------------------------------------


class _Pattern:
    """One pattern: its literal text when it is a plain name, its NFA when it is not (or when a
    key holds a newline, which ``$`` treats specially; names never do, but the answer stays exact)."""

    def __init__(self, text: str, budget: Budget) -> None:
        if len(text) > MAX_PATTERN_CHARS:
            raise PatternError(f"is {len(text):,} characters long (at most {MAX_PATTERN_CHARS:,})")
        try:
            re.compile(rf"(.*\.)?({text})$")  # re's own verdict on the syntax comes first
        except re.error as exc:
            raise PatternError(f"is not a valid regular expression ({exc.msg})") from None
        self.text, self.budget = text, budget
        self.literal = _plain_name(text)
        self._nfa: _Nfa | None = None
        if self.literal is None:
            self.nfa()  # compiled now, so that a refused construct is reported up front

    def nfa(self) -> _Nfa:
        """PEFT's whole expression for this pattern, parsed exactly as ``re`` parses it."""
        if self._nfa is None:
            parsed = _parser.parse(rf"(.*\.)?({self.text})$", 0)
            flags = _flags(parsed.state.flags)
            nfa = _Nfa([0], self.budget)
            nfa.start = _Compiler(nfa).sequence(list(parsed.data), flags, nfa.add("match"))
            self._nfa = nfa
        return self._nfa

    def matches(self, key: str) -> bool:
        """``re.match(rf"(.*\\.)?({pattern})$", key)`` is not None."""
        if self.literal is not None and "\n" not in key:
            # The expression then matches the key itself, or the key's end after a dot.
            return key == self.literal or key.endswith("." + self.literal)
        return bool(self.nfa().ends(key, 0, first=True))


def _plain_name(pattern: str) -> str | None:
    """The characters ``pattern`` stands for if ``re`` reads it as literal characters only."""
    try:
        parsed = _parser.parse(pattern, 0)
    except Exception:  # noqa: BLE001 - not parseable alone (e.g. "a)|(b"): not a plain name
        return None
    items: list[tuple[Any, Any]] = list(parsed.data)
    if not pattern or parsed.state.flags & ~re.UNICODE or any(str(op) != "LITERAL" for op, _ in items):
        return None
    return "".join(chr(code) for _, code in items)


class PatternMatcher:
    """One config field's patterns (``rank_pattern`` or ``alpha_pattern``), in file order, matched
    as PEFT's ``get_pattern_key`` matches them."""

    def __init__(self, patterns: Iterable[str], budget: Budget) -> None:
        """Check and compile every pattern; a PatternError says what is wrong with the first
        refused one (its ``pattern``)."""
        self._patterns: list[_Pattern] = []
        for text in patterns:
            try:
                self._patterns.append(_Pattern(text, budget))
            except PatternError as exc:
                exc.pattern = text
                raise

    def first_match(self, key: str) -> str | None:
        """The first pattern matching ``key`` (its module name in the base model), or None."""
        return next((p.text for p in self._patterns if p.matches(key)), None)
