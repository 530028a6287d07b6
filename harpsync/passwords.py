"""Password hashing (scrypt) and ``authorization`` parsing.

Only :mod:`hashlib` and :mod:`hmac` are used for the cryptography here; certificates and
TLS live in :mod:`harpsync.security`, which re-exports everything in this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Any

__all__ = ["hash_password", "verify_password", "parse_authorization"]

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 64
_MAXMEM = 64 * 1024 * 1024  # scrypt needs 128 * n * r bytes; 16 MiB for the defaults


def _b64(data: bytes) -> str:
    """Encode bytes as standard padded base64 text."""
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    """Hash a password with scrypt and a fresh random salt.

    Args:
        password: The clear-text password.

    Returns:
        A string ``scrypt$16384$8$1$<salt b64>$<hash b64>``.

    Raises:
        TypeError: If ``password`` is not a string.
    """
    if not isinstance(password, str):
        raise TypeError("password must be a string")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        dklen=HASH_BYTES,
        maxmem=_MAXMEM,
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Check a password against a string made by :func:`hash_password`.

    Args:
        password: The clear-text password offered by the client.
        stored: The stored hash string.

    Returns:
        True if the password matches; False if it does not or if ``stored`` is malformed
        (this function never raises).
    """
    if not isinstance(password, str) or not isinstance(stored, str):
        return False
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        expected = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        return False
    # Bound the cost parameters so a crafted row cannot exhaust memory or CPU.
    if not (2 <= n <= 2**16 and n & (n - 1) == 0 and 1 <= r <= 16 and 1 <= p <= 4):
        return False
    if not salt or not 16 <= len(expected) <= 128:
        return False
    try:
        actual = hashlib.scrypt(
            password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
            dklen=len(expected), maxmem=_MAXMEM,
        )
    except (ValueError, MemoryError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(actual, expected)


def parse_authorization(value: str | dict[str, Any] | None) -> tuple[str, str] | None:
    """Read credentials from an ``authorization`` value.

    Args:
        value: ``{"username": ..., "password": ...}``, an HTTP ``Basic <base64>`` header
            value, or None.

    Returns:
        ``(username, password)``, or None when no credentials were given (None, an empty
        string or an empty dict).

    Raises:
        ValueError: If the value is malformed. The message never contains the password.
    """
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, dict):
        username, password = value.get("username"), value.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            raise ValueError("authorization must have a string 'username' and 'password'")
        return username, password
    if not isinstance(value, str):
        raise ValueError("authorization must be an object or a 'Basic' header string")
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic":
        raise ValueError("authorization header must use the 'Basic' scheme")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise ValueError("Invalid character in Basic authorization header") from None
    username, sep, password = decoded.partition(":")
    if not sep:
        raise ValueError("Invalid character: Basic authorization must be 'username:password'")
    return username, password
