"""The storage sizes a legacy (pre-zip) ``torch.save`` file declares, read without unpickling it.

A legacy file is five pickles (magic number, protocol, system info, the state dict, the storage
keys) followed by the storages' bytes. ``torch.load`` allocates every storage at the size the
state dict's pickle declares (a persistent id ``("storage", type, key, location, numel, view)``)
while it reads that pickle, before it reads any data: a file of a few hundred bytes can declare
terabytes. This module walks the pickles' opcodes itself, decoding arguments and keeping only
strings, integers, tuples and the memo, never building an object or calling anything, and sums
the element counts declared; a file whose storages cannot fit in it is then refused before
``torch.load`` sees it.

(Loading the file with fake tensors first would give the same numbers, but building torch's
fake tensor mode costs seconds per process; this walk costs microseconds per opcode.)
"""

from __future__ import annotations

from typing import IO, Any

#: Pickles read before the storages: magic number, protocol, system info, the state dict.
STATE_DICT_PICKLE = 3


class PickleWalkError(ValueError):
    """The bytes are not a pickle this walk can follow (truncated, an unknown opcode).
    ``index``: which of the file's pickles (0-2: torch itself refuses the file before it
    allocates anything; 3: the state dict)."""

    index = 0


def declared_storage_elements(f: IO[bytes]) -> tuple[int, int]:
    """(elements of all storages the state dict declares, file offset after its pickle).

    Raises PickleWalkError (with its ``index``) if these pickles cannot be walked.
    """
    declared: dict[str, int] = {}
    for index in range(STATE_DICT_PICKLE + 1):
        try:
            _walk(f, declared if index == STATE_DICT_PICKLE else None)
        except PickleWalkError as exc:
            exc.index = index
            raise
    return sum(declared.values()), f.tell()


# -- opcodes (protocols 0-5), by how their argument is laid out -------------------------------------

_NO_ARG = frozenset(b"(.012N\x88\x89}])\x8f\x91\x90aebdlt\x85\x86\x87suR\x81\x92\x93\x94Qo\x97\x98")
#: opcode -> size of a fixed-size argument (ints little-endian; FRAME's is skipped).
_FIXED = {0x80: 1, ord("K"): 1, ord("h"): 1, ord("q"): 1, 0x82: 1, ord("M"): 2, 0x83: 2}
_FIXED.update({ord("J"): 4, ord("j"): 4, ord("r"): 4, 0x84: 4, ord("G"): 8, 0x95: 8})
#: opcode -> (size of the length prefix, whether the length is signed), for counted arguments.
_COUNTED = {ord("U"): (1, False), 0x8C: (1, False), ord("C"): (1, False), 0x8A: (1, False)}
_COUNTED.update({ord("T"): (4, True), ord("X"): (4, False), ord("B"): (4, False), 0x8B: (4, True)})
_COUNTED.update({0x8D: (8, False), 0x8E: (8, False), 0x96: (8, False)})
#: Opcodes whose argument is a line of text (GLOBAL and INST take two).
_LINE = frozenset(b"ILFSVgpP")
_TWO_LINES = frozenset(b"ci")

_STRINGS = frozenset(b"UTX\x8c\x8dSV")
_INTS = frozenset(b"KMJ\x8a\x8bIL")
_PUTS = frozenset(b"pqr")
_GETS = frozenset(b"ghj")

#: Stack effects of the opcodes not handled one by one: (values popped, values pushed), with
#: "mark" meaning everything down to the last mark, the mark included.
_EFFECTS: dict[int, tuple[int | str, int]] = {
    ord("0"): (1, 0),
    ord("1"): ("mark", 0),
    ord("N"): (0, 1),
    0x88: (0, 1),
    0x89: (0, 1),
    ord("}"): (0, 1),
    ord("]"): (0, 1),
    0x8F: (0, 1),
    0x91: ("mark", 1),
    0x90: ("mark", 0),
    ord("a"): (1, 0),
    ord("e"): ("mark", 0),
    ord("b"): (1, 0),
    ord("d"): ("mark", 1),
    ord("l"): ("mark", 1),
    ord("s"): (2, 0),
    ord("u"): ("mark", 0),
    ord("R"): (2, 1),
    0x81: (2, 1),
    0x92: (3, 1),
    0x93: (2, 1),
    ord("o"): ("mark", 1),
    ord("i"): ("mark", 1),
    0x97: (0, 1),
    0x98: (1, 1),
    0x80: (0, 0),
    0x95: (0, 0),
    ord("c"): (0, 1),
    0x82: (0, 1),
    0x83: (0, 1),
    0x84: (0, 1),
    ord("G"): (0, 1),
    ord("F"): (0, 1),
    ord("C"): (0, 1),
    ord("B"): (0, 1),
    0x8E: (0, 1),
    0x96: (0, 1),
}


class _Other:
    """A value the walk does not model (a dict, a global, a reduced object)."""


_OTHER = _Other()
_MARK = _Other()


def _read(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise PickleWalkError("pickle ends before its STOP")
    return data


def _line(f: IO[bytes]) -> bytes:
    line = f.readline(1 << 20)
    if not line.endswith(b"\n"):
        raise PickleWalkError("pickle text argument without its newline")
    return line[:-1]


def _argument(f: IO[bytes], code: int) -> Any:
    """The decoded argument of opcode ``code`` (None where it has none)."""
    if code in _NO_ARG:
        return None
    if code in _FIXED:
        raw = _read(f, _FIXED[code])
        return int.from_bytes(raw, "little", signed=code == ord("J")) if code != ord("G") else None
    if code in _COUNTED:
        width, signed = _COUNTED[code]
        n = int.from_bytes(_read(f, width), "little", signed=signed)
        if n < 0:
            raise PickleWalkError("negative length in a pickle")
        raw = _read(f, n)
        if code in (0x8A, 0x8B):  # LONG1, LONG4: a two's complement integer
            return int.from_bytes(raw, "little", signed=True)
        return raw.decode("utf-8", "replace") if code in _STRINGS else None
    if code in _LINE:
        text = _line(f)
        if code in (ord("I"), ord("L"), ord("g"), ord("p")):
            try:
                return int(text.rstrip(b"L") or b"0", 10)
            except ValueError:
                raise PickleWalkError("a malformed integer in a pickle") from None
        value = text.decode("utf-8", "replace")
        if code == ord("S") and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]  # STRING's argument is a quoted literal: 'storage'
        return value
    if code in _TWO_LINES:
        _line(f)
        _line(f)
        return None
    raise PickleWalkError(f"unknown pickle opcode {code:#04x}")


def _walk(f: IO[bytes], declared: dict[str, int] | None) -> None:
    """Read one pickle up to its STOP; with ``declared``, record every storage's element count."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    while True:
        code = _read(f, 1)[0]
        arg = _argument(f, code)
        if code == ord("."):
            return
        if code in _STRINGS or code in _INTS:
            stack.append(arg)
        elif code == ord("("):
            stack.append(_MARK)
        elif code == ord(")"):
            stack.append(())
        elif code == ord("t"):
            at = _mark(stack)
            items = tuple(stack[at + 1 :])
            del stack[at:]
            stack.append(items)
        elif code in (0x85, 0x86, 0x87):
            n = code - 0x84
            if len(stack) < n:
                raise PickleWalkError("a tuple of more items than the stack holds")
            items = tuple(stack[len(stack) - n :])
            del stack[len(stack) - n :]
            stack.append(items)
        elif code == ord("2"):
            stack.append(_top(stack))
        elif code in _PUTS:
            memo[arg] = _top(stack)
        elif code == 0x94:
            memo[len(memo)] = _top(stack)
        elif code in _GETS:
            stack.append(memo.get(arg, _OTHER))
        elif code in (ord("Q"), ord("P")):
            pid = stack.pop() if code == ord("Q") and stack else arg
            if declared is not None:
                _declare(pid, declared)
            stack.append(_OTHER)
        else:
            pops, pushes = _EFFECTS[code]
            if pops == "mark":
                del stack[_mark(stack) :]
            elif isinstance(pops, int) and pops:
                if len(stack) < pops:
                    raise PickleWalkError("an opcode takes more items than the stack holds")
                del stack[len(stack) - pops :]
            stack.extend([_OTHER] * pushes)


def _declare(pid: Any, declared: dict[str, int]) -> None:
    """``declared[key] = numel`` for a storage's persistent id.

    Other persistent ids allocate nothing (torch refuses them, or they are modules): they are
    left to ``torch.load``. A storage whose key or element count is not a literal string and
    integer is refused: torch's own files always state them, and a computed size is unknown.
    """
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
        return
    if len(pid) != 6 or not isinstance(pid[2], str) or not isinstance(pid[4], int) or pid[4] < 0:
        raise PickleWalkError("a storage without a literal key and element count")
    declared[pid[2]] = max(declared.get(pid[2], 0), pid[4])


def _top(stack: list[Any]) -> Any:
    if not stack:
        raise PickleWalkError("an opcode needs a value on an empty stack")
    return stack[-1]


def _mark(stack: list[Any]) -> int:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            return i
    raise PickleWalkError("no mark on the pickle's stack")
