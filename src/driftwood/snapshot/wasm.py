"""Reading a module's code just enough to find wasi-libc's run-once flag in ``_start``.

crt1-command.c's ``_start`` begins ``static volatile int started; if (started) trap;
started = 1;``. A resumed actor runs ``_start`` again on restored memory, where the flag is 1:
the host clears it (see :mod:`driftwood.snapshot.actor`). Only the handful of instructions that
prologue compiles to are decoded; anything else means "no guard found".
"""

from __future__ import annotations


def start_guard(wasm: bytes) -> int | None:
    """The address of wasi-libc's run-once flag, or None when ``_start`` does not begin with it.

    crt1-command.c's ``_start`` begins ``static volatile int started; if (started) trap;
    started = 1;``: an ``i32.load`` and an ``i32.store`` of constant 1 to the same constant
    address, before any call. That is what this looks for in the module's code.
    """
    try:
        body = _function_body(wasm, "_start")
        if body is None:
            return None
        n, i = _leb(body, 0)
        for _ in range(n):  # local declarations
            _, i = _leb(body, i)
            i += 1
        consts: list[int] = []
        loaded = None
        for _ in range(32):
            op = body[i]
            i += 1
            if op in (0x02, 0x03, 0x04):  # block, loop, if: one-byte block type
                i += 1
            elif op in (0x0C, 0x0D):  # br, br_if
                _, i = _leb(body, i)
            elif op in (0x00, 0x01, 0x0B, 0x1A, 0x45):  # unreachable, nop, end, drop, i32.eqz
                pass
            elif op == 0x41:  # i32.const
                value, i = _leb(body, i, signed=True)
                consts.append(value)
            elif op == 0x28:  # i32.load align offset
                _, i = _leb(body, i)
                offset, i = _leb(body, i)
                loaded = consts.pop() + offset if consts else None
            elif op == 0x36:  # i32.store align offset
                _, i = _leb(body, i)
                offset, i = _leb(body, i)
                if len(consts) < 2 or consts[-1] != 1:
                    return None
                address = consts[-2] + offset
                return address if address == loaded and address >= 0 else None
            else:
                return None
    except (IndexError, ValueError):
        return None
    return None


def _leb(data: bytes, i: int, signed: bool = False) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
        if shift > 63:
            raise ValueError("LEB128 too long")
    if signed and byte & 0x40:
        result -= 1 << shift
    return result, i


def _function_body(wasm: bytes, export: str) -> bytes | None:
    """The code of exported function ``export`` (None if it is not a defined function)."""
    if wasm[:8] != b"\0asm\x01\0\0\0":
        return None
    sections: dict[int, bytes] = {}
    i = 8
    while i < len(wasm):
        sid = wasm[i]
        size, i = _leb(wasm, i + 1)
        if sid:
            sections.setdefault(sid, wasm[i : i + size])
        i += size
    imported = 0
    if 2 in sections:  # imports: count the imported functions
        s = sections[2]
        n, j = _leb(s, 0)
        for _ in range(n):
            for _field in range(2):
                length, j = _leb(s, j)
                j += length
            kind = s[j]
            j += 1
            if kind == 0:
                _, j = _leb(s, j)
                imported += 1
            else:
                return None  # tables, memories, globals imported: not a plain wasi command
    if 7 not in sections or 10 not in sections:
        return None
    s = sections[7]
    n, j = _leb(s, 0)
    index = None
    for _ in range(n):
        length, j = _leb(s, j)
        name = s[j : j + length].decode("utf-8", "replace")
        j += length
        kind = s[j]
        idx, j = _leb(s, j + 1)
        if name == export and kind == 0:
            index = idx - imported
    if index is None or index < 0:
        return None
    s = sections[10]
    n, j = _leb(s, 0)
    for f in range(n):
        size, j = _leb(s, j)
        if f == index:
            return s[j : j + size]
        j += size
    return None
