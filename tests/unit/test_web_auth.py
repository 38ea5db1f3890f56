"""The bearer check itself: constant-time comparison, clear 401s, no token configured = open."""

from __future__ import annotations

from pydantic import SecretStr

from processor.settings import Settings
from processor.web_auth import check_bearer

TOKEN = SecretStr("s3cr3t-token")


def test_no_token_configured_means_open() -> None:
    assert check_bearer(None, None) is None
    assert check_bearer("Bearer anything", SecretStr("")) is None


def test_missing_malformed_and_wrong_tokens_get_401() -> None:
    for header in (None, "", "Bearer", "Bearer   ", "Basic czNjcjN0LXRva2Vu", "s3cr3t-token"):
        denied = check_bearer(header, TOKEN)
        assert denied is not None, header
        assert denied.status == 401
        assert denied.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = check_bearer("Bearer s3cr3t-tokeN", TOKEN)
    assert wrong is not None
    assert "not valid" in wrong.body["error"]
    assert "s3cr3t" not in str(wrong)


def test_right_token_passes_any_scheme_case() -> None:
    assert check_bearer("Bearer s3cr3t-token", TOKEN) is None
    assert check_bearer("bearer s3cr3t-token ", TOKEN) is None


def test_settings_never_show_the_token() -> None:
    settings = Settings(api_token="s3cr3t-token")
    assert "s3cr3t-token" not in repr(settings)
    assert "s3cr3t-token" not in settings.model_dump_json()
