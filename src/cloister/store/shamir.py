"""Shamir secret sharing over GF(2^8), byte by byte (Shamir 1979).

The field is GF(2)[x] / (x^8 + x^4 + x^3 + x + 1), the AES field (0x11B): addition is XOR,
multiplication goes through log/antilog tables with generator 3. ``split`` gives each holder
``x`` (1..n) and ``f(x)`` for a random polynomial of degree ``threshold - 1`` per byte whose
constant term is that byte of the secret; ``combine`` interpolates at 0 (Lagrange). Fewer than
``threshold`` shares say nothing about the secret: every value is equally likely.

Shares carry no integrity: a wrong or altered share silently gives a wrong secret. Callers
check the result (the recovery kit keeps an identifier of the store key).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

_POLY = 0x11B


def _build_tables() -> tuple[list[int], list[int]]:
    exp = [0] * 510
    log = [0] * 256
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        # multiply by the generator 3: x*2 xor x, reduced by the field polynomial
        x2 = x << 1
        if x2 & 0x100:
            x2 ^= _POLY
        x = x2 ^ x
    for i in range(255, 510):
        exp[i] = exp[i - 255]
    return exp, log


_EXP, _LOG = _build_tables()


def add(a: int, b: int) -> int:
    return a ^ b


def mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def inv(a: int) -> int:
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(256)")
    return _EXP[255 - _LOG[a]]


def div(a: int, b: int) -> int:
    return mul(a, inv(b))


def _eval(coeffs: Sequence[int], x: int) -> int:
    """Horner's rule; ``coeffs[0]`` is the constant term."""
    y = 0
    for c in reversed(coeffs):
        y = add(mul(y, x), c)
    return y


def split(secret: bytes, threshold: int, count: int) -> list[tuple[int, bytes]]:
    """``count`` shares ``(x, y)`` of ``secret``, any ``threshold`` of which recover it."""
    if not 1 <= threshold <= count <= 255:
        raise ValueError("need 1 <= threshold <= count <= 255")
    if not secret:
        raise ValueError("nothing to share")
    ys = [bytearray() for _ in range(count)]
    for byte in secret:
        coeffs = [byte, *os.urandom(threshold - 1)]
        for i in range(count):
            ys[i].append(_eval(coeffs, i + 1))
    return [(i + 1, bytes(y)) for i, y in enumerate(ys)]


def combine(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """The secret, interpolated at 0 from ``shares`` (at least ``threshold`` distinct ones)."""
    if not shares:
        raise ValueError("no shares")
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs) or any(not 1 <= x <= 255 for x in xs):
        raise ValueError("share indices must be distinct and in 1..255")
    length = len(shares[0][1])
    if any(len(y) != length for _, y in shares):
        raise ValueError("shares differ in length")
    # Lagrange basis at 0: l_i = prod_{j != i} x_j / (x_j - x_i); in GF(2^8) minus is XOR.
    basis = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = mul(num, xj)
                den = mul(den, add(xj, xi))
        basis.append(div(num, den))
    out = bytearray(length)
    for (_, y), li in zip(shares, basis, strict=True):
        for k in range(length):
            out[k] ^= mul(y[k], li)
    return bytes(out)
