"""Route tokens and the worker login proof."""

import pytest

from shoal.security.tokens import (
    TokenError,
    check_login_proof,
    constant_time_in,
    login_proof,
    sign_token,
    verify_token,
)

KEY = b"k" * 32


def test_token_round_trip_and_claims():
    t = sign_token({"aud": "c1", "sub": "dev-7"}, KEY, ttl_s=60, now=1000)
    c = verify_token(t, KEY, "c1", now=1010)
    assert c["sub"] == "dev-7" and c["exp"] == 1060


@pytest.mark.parametrize(
    "mutate, now, aud, message",
    [
        (lambda t: t, 2000, "c1", "expired"),
        (lambda t: t, 1010, "c2", "another cluster"),
        (lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), 1010, "c1", "signature"),
        (lambda t: "x" + t, 1010, "c1", "signature|malformed"),
        (lambda t: "garbage", 1010, "c1", "malformed"),
    ],
)
def test_bad_tokens(mutate, now, aud, message):
    t = sign_token({"aud": "c1"}, KEY, ttl_s=60, now=1000)
    with pytest.raises(TokenError, match=message):
        verify_token(mutate(t), KEY, aud, now=now)


def test_token_signed_with_another_key_is_refused():
    t = sign_token({"aud": "c1"}, b"other", now=1000)
    with pytest.raises(TokenError, match="signature"):
        verify_token(t, KEY, "c1", now=1000)


def test_login_proof():
    p = login_proof(b"secret", b"nonce", "w1")
    assert check_login_proof(b"secret", b"nonce", "w1", p)
    assert not check_login_proof(b"wrong", b"nonce", "w1", p)
    assert not check_login_proof(b"secret", b"other", "w1", p)
    assert not check_login_proof(b"secret", b"nonce", "w1", "not bytes")


def test_constant_time_membership():
    assert constant_time_in("b", ["a", "b"])
    assert not constant_time_in("c", ["a", "b"])
    assert not constant_time_in("a", [])
