"""google_calendar_push: OAuth tokens encrypted at rest with Fernet (the ``almanac_token_fernet_key``).

The key material is one Fernet key, or several separated by commas for rotation: the first
encrypts, every one of them decrypts (``cryptography``'s ``MultiFernet``). Re-encrypt with
``TokenCipher.rotate`` and drop the old key once nothing needs it.
"""

from __future__ import annotations

from almanac.errors import ConfigError

__all__ = ["TokenCipher", "TokenDecryptError", "generate_key"]


class TokenDecryptError(ConfigError):
    """A stored token cannot be decrypted with the configured key(s).

    What to do: the Variable ``almanac_token_fernet_key`` (``AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY``)
    does not hold the key the token was encrypted with. Restore that key, or list it after the
    new one (``new_key,old_key``) while tokens are re-encrypted. A token whose key is lost
    cannot be recovered: the user must connect Google again.
    """


def generate_key() -> str:
    """A new random Fernet key (URL-safe base64 text), e.g. for a dev stack."""
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode("ascii")


class TokenCipher:
    """Encrypts and decrypts token strings with one or more Fernet keys.

    Parameters:
        keys: ``"key"`` or ``"new_key,old_key"`` (or a list of keys); the first encrypts.
    Raises:
        ConfigError: no key, or a key that is not a valid Fernet key (the key is never echoed).
    """

    def __init__(self, keys: str | list[str]) -> None:
        from cryptography.fernet import Fernet, MultiFernet

        parts = [k.strip() for k in (keys.split(",") if isinstance(keys, str) else keys) if k and k.strip()]
        if not parts:
            raise ConfigError("no token encryption key: set the Airflow Variable almanac_token_fernet_key")
        fernets = []
        for position, key in enumerate(parts, start=1):
            try:
                fernets.append(Fernet(key.encode("ascii")))
            except (ValueError, UnicodeEncodeError) as exc:
                raise ConfigError(
                    f"token encryption key #{position} of almanac_token_fernet_key is not a valid Fernet key "
                    "(32 url-safe base64-encoded bytes)"
                ) from exc
        self._fernet = MultiFernet(fernets)

    def __repr__(self) -> str:  # never show key material
        return "TokenCipher(<keys hidden>)"

    def encrypt(self, token: str) -> str:
        """The Fernet token (ASCII text) for ``token``."""
        return self._fernet.encrypt(token.encode("utf-8")).decode("ascii")

    def decrypt(self, stored: str, *, what: str = "token") -> str:
        """The plain token from ``stored``.

        Raises:
            TokenDecryptError: wrong key, or the stored value was altered.
        """
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(stored.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError) as exc:
            raise TokenDecryptError(
                f"cannot decrypt the stored {what}: it was encrypted with another key than "
                "almanac_token_fernet_key holds, or it was altered"
            ) from exc

    def rotate(self, stored: str) -> str:
        """``stored`` re-encrypted with the first key (after a key rotation)."""
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.rotate(stored.encode("ascii")).decode("ascii")
        except InvalidToken as exc:
            raise TokenDecryptError("cannot re-encrypt a stored token: none of the keys decrypts it") from exc
