"""Label Studio credentials against a loopback fake Label Studio: legacy tokens, personal access
tokens and their refresh, tokens from /setup, and no token in any log or message."""
from __future__ import annotations

import logging

import pytest

from sam_backend.common.text import redact_url
from sam_backend.errors import ConfigError, ImageError
from sam_backend.images.credentials import token_kind

from tests.support.loopback_hosts import LEGACY_TOKEN, SIGNATURE, assert_rotated_cat, make_jwt


def test_token_kinds_and_redaction():
    assert token_kind(LEGACY_TOKEN) == "legacy"
    assert token_kind(make_jwt({"token_type": "refresh", "exp": 1})) == "pat"
    assert token_kind(make_jwt({"token_type": "access", "exp": 1})) == "access"
    assert token_kind("a.b.c") == "legacy"
    shown = redact_url(f"https://user:pw@s3.example.com/b/k.jpg?X-Amz-Signature={SIGNATURE}&d=x")
    assert SIGNATURE not in shown and "pw" not in shown and "d=x" in shown
    assert redact_url("/data/local-files/?d=a/b.jpg") == "/data/local-files/?d=a/b.jpg"


def test_upload_with_legacy_token(ls, make_loader):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    assert_rotated_cat(loader.load("/data/upload/1/x.jpg"))
    assert ls.requests[-1][2] == f"Token {LEGACY_TOKEN}"


def test_legacy_token_refused_when_legacy_tokens_disabled(ls, make_loader):
    ls.legacy_enabled = False
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    with pytest.raises(ImageError) as err:
        loader.load("/data/upload/1/x.jpg")
    msg = str(err.value)
    assert "401" in msg and "/data/upload/1/x.jpg" in msg and "legacy" in msg
    assert "LABEL_STUDIO_API_KEY" in msg and "personal access token" in msg
    assert LEGACY_TOKEN not in msg


def test_setup_values_used_when_env_gives_none(ls, make_loader):
    loader = make_loader()
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL"):
        loader.load("/data/upload/1/x.jpg")
    loader.update_from_setup(ls.url, LEGACY_TOKEN)
    assert_rotated_cat(loader.load("/data/upload/1/x.jpg"))
    # Env/settings win over /setup.
    loader2 = make_loader(label_studio_url=ls.url, api_key=ls.pat)
    loader2.update_from_setup("http://127.0.0.1:9", "bogus-setup-token")
    loader2.load("/data/upload/1/y.png")
    assert ls.requests[-1][2].startswith("Bearer ")


@pytest.mark.parametrize("token", ["tökén", "tok\u20acen", "tok\r\nX-Evil: 1", "tok en", "tok\x00"])
def test_a_token_no_header_can_carry_is_named_as_the_problem(ls, make_loader, token):
    loader = make_loader()
    loader.update_from_setup(ls.url, token)
    for url in ("/data/upload/1/x.jpg", ls.url + "/data/upload/1/x.jpg", "s3://bucket/cat.jpg"):
        with pytest.raises(ImageError) as err:
            loader.load(url, task_id=1)
        message = str(err.value)
        assert "access token Label Studio sent in /setup cannot be used" in message, message
        assert "not a valid URL" not in message and token.strip() not in message
    assert ls.requests == []  # nothing was sent with it
    with pytest.raises(ConfigError, match="LABEL_STUDIO_API_KEY. cannot be used") as err:
        make_loader(label_studio_url=ls.url, api_key=token)
    assert token.strip() not in str(err.value)
    # a usable key in the environment wins over the /setup token, which is then not used
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    loader.update_from_setup(ls.url, token)
    assert_rotated_cat(loader.load("/data/upload/1/x.jpg"))


def test_no_credentials_and_login_redirect(ls, make_loader):
    ls.login_redirect = True
    loader = make_loader(label_studio_url=ls.url)
    with pytest.raises(ImageError) as err:
        loader.load("/data/upload/1/x.jpg")
    assert "no Label Studio API key" in str(err.value) and "LABEL_STUDIO_API_KEY" in str(err.value)


def test_personal_access_token_refresh_and_expiry(ls, make_loader, clock):
    loader = make_loader(label_studio_url=ls.url, api_key=ls.pat)
    assert_rotated_cat(loader.load("/data/upload/1/x.jpg"))
    assert ls.refreshes == 1
    assert ls.requests[-1][2] == f"Bearer {ls.issued[0]}"
    loader.load("/data/upload/1/y.png")
    assert ls.refreshes == 1  # the access token is reused while valid

    # The access token expires: the loader refreshes it before using it again.
    clock.advance(ls.access_lifetime + 1)
    assert not ls.authenticated(f"Bearer {ls.issued[0]}")
    loader.load("/data/upload/1/y.png")
    assert ls.refreshes == 2 and ls.rejected == []
    assert ls.requests[-1][2] == f"Bearer {ls.issued[1]}"

    # Label Studio stops accepting the access token early: 401, refresh, retry once.
    ls.revoked.add(ls.issued[1])
    loader.load("/data/upload/1/x.jpg")
    assert ls.refreshes == 3 and ls.rejected == [("/data/upload/1/x.jpg", "Bearer")]
    assert ls.requests[-1][2] == f"Bearer {ls.issued[2]}"


def test_concurrent_loads_share_one_access_token(ls, make_loader):
    from concurrent.futures import ThreadPoolExecutor

    loader = make_loader(label_studio_url=ls.url, api_key=ls.pat)
    with ThreadPoolExecutor(8) as pool:
        shapes = list(pool.map(lambda _: loader.load("/data/upload/1/y.png").shape, range(16)))
    assert shapes == [(6, 8, 3)] * 16 and ls.refreshes == 1 and ls.rejected == []


def test_personal_access_token_rejected(ls, make_loader):
    bad = make_jwt({"token_type": "refresh", "exp": 4102444800, "jti": "other"})
    loader = make_loader(label_studio_url=ls.url, api_key=bad)
    with pytest.raises(ImageError) as err:
        loader.load("/data/upload/1/x.jpg")
    msg = str(err.value)
    assert "personal access token" in msg and "LABEL_STUDIO_API_KEY" in msg and bad not in msg


def test_no_token_in_logs_or_errors(ls, storage, make_loader, clock, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    ls.cloud["s3://bucket/cat.jpg"] = storage.presigned("/bucket/cat.jpg")
    messages = []

    def attempt(fn):
        try:
            fn()
        except ImageError as exc:
            messages.append(str(exc))

    legacy = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    attempt(lambda: legacy.load("/data/upload/1/x.jpg"))
    attempt(lambda: legacy.load("s3://bucket/cat.jpg", task_id=1))
    pat = make_loader(label_studio_url=ls.url, api_key=ls.pat, cache_dir=str(tmp_path / "c"),
                      cache_max_bytes=10**6)
    attempt(lambda: pat.load("/data/upload/1/x.jpg"))
    clock.advance(ls.access_lifetime * 2)
    attempt(lambda: pat.load("/data/upload/1/y.png"))
    ls.revoked.update(ls.issued)
    attempt(lambda: pat.load("s3://bucket/cat.jpg", task_id=1))
    attempt(lambda: pat.load("/data/upload/1/page.jpg"))
    attempt(lambda: pat.load("/data/upload/1/missing.jpg"))
    setup = make_loader()
    setup.update_from_setup(ls.url, LEGACY_TOKEN)
    attempt(lambda: setup.load("/data/upload/1/y.png"))
    ls.legacy_enabled = False
    attempt(lambda: setup.load("/data/upload/1/x.jpg"))
    wrong = make_jwt({"token_type": "refresh", "exp": 4102444800, "jti": "wrong"})
    attempt(lambda: make_loader(label_studio_url=ls.url, api_key=wrong).load("/data/upload/1/x.jpg"))
    attempt(lambda: make_loader(label_studio_url=ls.url, api_key="Token " + LEGACY_TOKEN)
            .load("/data/upload/1/x.jpg"))

    assert len(messages) >= 4 and ls.refreshes >= 3
    secrets = [LEGACY_TOKEN, ls.pat, wrong, *ls.issued]
    everything = caplog.text + "\n".join(messages)
    for secret in secrets:
        assert secret not in everything
        assert secret.split(".")[-1] not in everything  # not even a JWT's signature part
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("sam_backend"))
    assert ours and SIGNATURE not in ours and SIGNATURE not in "\n".join(messages)

