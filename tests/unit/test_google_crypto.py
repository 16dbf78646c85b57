"""Refresh tokens are encrypted at rest with Fernet (almanac.google.crypto)."""

from __future__ import annotations

import pytest

from almanac.errors import ConfigError
from almanac.google.crypto import TokenCipher, TokenDecryptError, generate_key


def test_encrypt_then_decrypt_gives_the_token_back_and_never_stores_it_in_clear():
    cipher = TokenCipher(generate_key())
    stored = cipher.encrypt("1//refresh-token-é")
    assert "refresh-token" not in stored
    assert cipher.encrypt("1//refresh-token-é") != stored  # random IV: equal tokens don't look equal
    assert cipher.decrypt(stored) == "1//refresh-token-é"


def test_a_wrong_key_gives_a_clear_error_naming_the_variable_not_the_token():
    stored = TokenCipher(generate_key()).encrypt("1//secret-refresh")
    with pytest.raises(TokenDecryptError, match="almanac_token_fernet_key") as caught:
        TokenCipher(generate_key()).decrypt(stored, what="refresh token")
    assert "secret-refresh" not in str(caught.value)
    assert "refresh token" in str(caught.value)
    assert isinstance(caught.value, ConfigError)


def test_an_altered_token_is_refused():
    cipher = TokenCipher(generate_key())
    stored = cipher.encrypt("1//secret-refresh")
    with pytest.raises(TokenDecryptError):
        cipher.decrypt(stored[:-4] + ("AAAA" if not stored.endswith("AAAA") else "BBBB"))


def test_rotation_new_key_first_old_key_still_decrypts_and_rotate_moves_to_the_new_key():
    old, new = generate_key(), generate_key()
    stored_with_old = TokenCipher(old).encrypt("tok")
    both = TokenCipher(f"{new}, {old}")
    assert both.decrypt(stored_with_old) == "tok"
    rotated = both.rotate(stored_with_old)
    assert TokenCipher(new).decrypt(rotated) == "tok"
    with pytest.raises(TokenDecryptError):
        TokenCipher(old).decrypt(rotated)


@pytest.mark.parametrize("keys", ["", " , ", "not-a-fernet-key"])
def test_a_missing_or_malformed_key_is_a_config_error_that_does_not_echo_the_key(keys):
    with pytest.raises(ConfigError) as caught:
        TokenCipher(keys)
    assert "not-a-fernet-key" not in str(caught.value)


def test_repr_hides_the_keys():
    key = generate_key()
    assert key not in repr(TokenCipher(key))
