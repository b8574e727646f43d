"""Password hashes, login checks, CSRF tokens and the session signing key of the web page.

Password hashes use the standard library's scrypt with a random 16-byte salt and are stored as
``scrypt$<n>$<r>$<p>$<salt, base64>$<hash, base64>`` in ``[web] users``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

HASH_SCHEME = "scrypt"

#: scrypt cost parameters (CPU/memory cost n, block size r, parallelism p); n = 2**14 with
#: r = 8 needs 16 MiB per hash.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_KEY_BYTES = 32
SALT_BYTES = 16

#: Largest scrypt memory a stored hash may ask for, in bytes, so a crafted hash cannot
#: exhaust memory at login.
SCRYPT_MAX_MEMORY_BYTES = 256 * 1024 * 1024

#: File in the data folder that contains the generated session signing key.
SECRET_FILE_NAME = "web-session.key"

#: Bytes of randomness in a generated session key and in a CSRF token.
SECRET_BYTES = 32
CSRF_TOKEN_BYTES = 24

# Verified against when the user name is unknown, so that the response takes as long as for a
# known user with a wrong password.
_DUMMY_HASH: str | None = None


class PasswordHashError(ValueError):
    """Raised when a stored password hash is not in the ``scrypt$n$r$p$salt$hash`` format."""


def hash_password(password: str) -> str:
    """Hash ``password`` with scrypt and a new random salt.

    Returns
    -------
    str
        ``scrypt$<n>$<r>$<p>$<salt>$<hash>`` with base64 salt and hash, for ``[web] users``.

    Raises
    ------
    ValueError
        When the password is empty.
    """
    if not password:
        raise ValueError("The password is empty: choose a non-empty password")
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_KEY_BYTES)
    return "$".join(
        [HASH_SCHEME, str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(key)]
    )


def verify_password(password: str, encoded: str) -> bool:
    """Return whether ``password`` matches a hash from :func:`hash_password`.

    Raises
    ------
    PasswordHashError
        When ``encoded`` is not a valid hash, naming what is wrong with it.
    """
    n, r, p, salt, expected = _parse_hash(encoded)
    key = _scrypt(password, salt, n, r, p, len(expected))
    return hmac.compare_digest(key, expected)


def check_login(users: dict[str, str], user_name: str, password: str) -> bool:
    """Return whether ``user_name`` is configured and ``password`` matches its hash.

    An unknown user name costs the same scrypt work as a wrong password. A malformed hash in
    the configuration is logged as an error and never matches.
    """
    global _DUMMY_HASH

    encoded = users.get(user_name)
    if encoded is None:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = hash_password(secrets.token_hex(8))
        verify_password(password, _DUMMY_HASH)
        return False

    try:
        return verify_password(password, encoded)
    except PasswordHashError as error:
        logger.error("Password hash of web user %r is invalid: %s", user_name, error)
        return False


def new_csrf_token() -> str:
    """Return a random token for the hidden ``csrf_token`` field of forms."""
    return secrets.token_urlsafe(CSRF_TOKEN_BYTES)


def csrf_token_matches(expected: str | None, received: str | None) -> bool:
    """Compare the session's CSRF token with the one a form sent, in constant time."""
    if not expected or not received:
        return False
    return hmac.compare_digest(expected.encode(), received.encode())


def load_or_create_secret(data_dir: Path, configured: str = "") -> str:
    """Return the key that signs session cookies.

    Parameters
    ----------
    data_dir : Path
        The node's data folder; a generated key lives in ``<data_dir>/web-session.key``.
    configured : str, optional
        ``[web] secret_key``; used when not empty.

    Returns
    -------
    str
        The configured key, the key read from the file, or a new random key written to the
        file with mode 0600 at first start.
    """
    if configured:
        return configured

    path = Path(data_dir) / SECRET_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            logger.warning(
                "Session key file %s has mode %o, readable by other users; run chmod 600 on it",
                path,
                mode,
            )
        return path.read_text(encoding="ascii").strip()

    key = secrets.token_urlsafe(SECRET_BYTES)
    with os.fdopen(descriptor, "w", encoding="ascii") as stream:
        stream.write(key + "\n")
    logger.info("Generated the web session key in %s (mode 0600)", path)
    return key


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != HASH_SCHEME:
        raise PasswordHashError(
            "expected 6 fields scrypt$n$r$p$salt$hash; create the hash with "
            "livernode web hash-password"
        )
    try:
        n, r, p = (int(value) for value in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise PasswordHashError(
            "n, r and p must be integers and salt and hash base64; create the hash with "
            "livernode web hash-password"
        ) from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or not salt or not key:
        raise PasswordHashError(f"invalid scrypt parameters n={n}, r={r}, p={p} or empty salt or hash")
    if 128 * n * r > SCRYPT_MAX_MEMORY_BYTES:
        raise PasswordHashError(
            f"scrypt parameters n={n}, r={r} need more than {SCRYPT_MAX_MEMORY_BYTES} bytes"
        )
    return n, r, p, salt, key


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        dklen=length,
        maxmem=SCRYPT_MAX_MEMORY_BYTES + 1024 * 1024,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
