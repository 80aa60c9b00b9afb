"""Label Studio's address and credentials: where ``LABEL_STUDIO_API_KEY`` may go, and the tokens.

Address: ``LABEL_STUDIO_URL`` (else ``LABEL_STUDIO_HOST``), else the ``hostname`` sent in
``/setup``. Token: ``LABEL_STUDIO_API_KEY`` (else ``LABEL_STUDIO_ACCESS_TOKEN``), else the
``access_token`` sent in ``/setup``.

Where the key may go. Label Studio credentials are sent only to a host:port equal to Label
Studio's (or to an https upgrade of Label Studio's own host): :meth:`LabelStudioAccess.is_label_studio`.
``LABEL_STUDIO_API_KEY`` is sent only to ``LABEL_STUDIO_URL`` or, when that is not set, to the
hostname of a ``/setup`` that came with valid basic auth (``update_from_setup(...,
authenticated=True)``); a hostname from an unauthenticated ``/setup`` could come from anyone, so
fetches that would carry the key there fail with a message naming ``LABEL_STUDIO_URL``. The token
sent in ``/setup`` itself is used for its own hostname.

Tokens. A legacy token is sent as ``Authorization: Token <t>``. A personal access token (PAT) is a
JWT refresh token: it is exchanged at ``/api/token/refresh/`` for a short-lived access token, sent
as ``Authorization: Bearer <access>``, refreshed shortly before the access token's ``exp`` and,
once, when Label Studio answers 401/403 (the caller asks with ``force_refresh``). The two kinds are
told apart by shape: three base64url parts whose first two decode to JSON objects are a JWT
(``token_type`` ``refresh`` or absent: a PAT; ``access``: used as a bearer token as is, it cannot
be refreshed); anything else is a legacy token. Tokens are never logged and never put into error
messages.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import threading
import time
from typing import Callable, Dict, Optional, Tuple
from urllib.parse import urljoin, urlsplit

import requests

from sam_backend.common.text import redact_url
from sam_backend.errors import ConfigError, ImageError
from sam_backend.images import messages
from sam_backend.images.disk_cache import text_digest
from sam_backend.images.messages import PAT_HOWTO, kind_label
from sam_backend.images.sources import normalise_base_url, origin

logger = logging.getLogger(__name__)

# Refresh a JWT access token this many seconds before its ``exp`` (capped at a tenth of its life).
_ACCESS_TOKEN_SKEW = 10.0


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def jwt_payload(token: str) -> Optional[dict]:
    """The payload of a JWT-shaped token, not verified; None if ``token`` is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3 or not all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in parts[:2]):
        return None
    try:
        header = json.loads(_b64url_decode(parts[0]))
        payload = json.loads(_b64url_decode(parts[1]))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        return None
    return payload


def token_kind(token: str) -> str:
    """``"legacy"``, ``"pat"`` (JWT refresh token) or ``"access"`` (JWT access token)."""
    payload = jwt_payload(token)
    if payload is None:
        return "legacy"
    if payload.get("token_type") == "access":
        return "access"
    return "pat"


# Every Label Studio token (a legacy token's hex, a JWT's base64url) is visible ASCII; anything
# else cannot be what Label Studio issued, and an HTTP header cannot carry it as is.
_TOKEN_TEXT = re.compile(r"[!-~]+")


def _unusable(what: str) -> str:
    """Why a token (named by ``what``, never shown) cannot be used."""
    return (f"{what} cannot be used: it contains characters other than visible ASCII (letters "
            "with accents or other non-ASCII characters, spaces or control characters), which no "
            "Label Studio token has. Copy the token again, or set LABEL_STUDIO_API_KEY to a "
            f"personal access token (Label Studio -> {PAT_HOWTO})")


def _clean_token(token: Optional[str]) -> Optional[str]:
    if token is None:
        return None
    token = token.strip().strip("'\"").strip()
    for prefix in ("token ", "bearer "):
        if token.lower().startswith(prefix):
            token = token[len(prefix):].strip()
    return token or None


def _exp_of(payload: Optional[dict]) -> Optional[float]:
    if not payload:
        return None
    exp = payload.get("exp")
    return float(exp) if isinstance(exp, (int, float)) and math.isfinite(exp) else None


def _expired(kind: str, source: str, exp: float) -> str:
    if kind == "access":
        return (f"the Label Studio API key {source} is a JWT access token that has expired. Set "
                f"LABEL_STUDIO_API_KEY to a personal access token (Label Studio -> {PAT_HOWTO}), "
                "which the backend refreshes by itself")
    return (f"the personal access token {source} expired on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(exp))}: create a new one "
            f"(Label Studio -> {PAT_HOWTO}) and set LABEL_STUDIO_API_KEY to it")


class LabelStudioAccess:
    """Label Studio's address and the credentials for it (module docstring); thread-safe.
    ``session`` posts the token refreshes (``timeout`` seconds); ``clock`` tells token expiry."""

    def __init__(self, url: Optional[str], api_key: Optional[str], session: requests.Session,
                 timeout: float, clock: Callable[[], float] = time.time):
        self.env_url = normalise_base_url(url, "LABEL_STUDIO_URL") if url else None
        self._env_token = _clean_token(api_key)
        if self._env_token and not _TOKEN_TEXT.fullmatch(self._env_token):
            raise ConfigError(_unusable("the Label Studio API key (LABEL_STUDIO_API_KEY)"))
        self.setup_url: Optional[str] = None
        self.setup_trusted = False  # that /setup came with valid basic auth
        self._setup_token: Optional[str] = None
        self._session = session
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.RLock()
        self._access: Optional[str] = None
        self._access_exp: Optional[float] = None
        self._access_life: Optional[float] = None
        self._access_for: Optional[str] = None  # hash of the PAT it came from
        if self._env_token:
            logger.debug("Label Studio API key from LABEL_STUDIO_API_KEY (%s)",
                         kind_label(token_kind(self._env_token)))

    def update_from_setup(self, hostname: Optional[str], access_token: Optional[str],
                          authenticated: bool = False) -> None:
        """Values Label Studio sent in /setup; used only where the settings/env give none.

        ``authenticated``: the /setup came with valid HTTP basic auth, i.e. from Label Studio.
        Only then may LABEL_STUDIO_API_KEY go to its hostname; from an unauthenticated /setup
        (anyone who reaches the port) the hostname is used with the token sent alongside it only.
        """
        with self._lock:
            if hostname and hostname.strip():
                try:
                    url = normalise_base_url(hostname, "the hostname sent in /setup")
                except ConfigError as exc:
                    logger.warning("%s; ignoring it", exc)
                    url = None
                if url and (url != self.setup_url or authenticated != self.setup_trusted):
                    self.setup_url = url
                    self.setup_trusted = bool(authenticated)
                    if self.env_url:
                        logger.debug("/setup hostname %s ignored: LABEL_STUDIO_URL is %s", url,
                                     self.env_url)
                    else:
                        logger.info("Label Studio URL from /setup: %s", url)
                        if self._env_token and not authenticated:
                            # Whoever calls an unauthenticated /setup would pick where the key goes.
                            logger.warning(
                                "LABEL_STUDIO_API_KEY is not sent to %s: that address came from a "
                                "/setup without basic auth. Set LABEL_STUDIO_URL to Label Studio's "
                                "address (or turn on basic auth)", url)
            token = _clean_token(access_token)
            if token and token != self._setup_token:
                self._setup_token = token
                if self._env_token:
                    logger.debug("/setup access token ignored: LABEL_STUDIO_API_KEY is set")
                elif not _TOKEN_TEXT.fullmatch(token):
                    logger.warning("%s", _unusable("the access token Label Studio sent in /setup"))
                else:
                    logger.info("Using the Label Studio access token sent in /setup (%s)",
                                kind_label(token_kind(token)))

    @property
    def url(self) -> Optional[str]:
        return self.env_url or self.setup_url

    @property
    def url_source(self) -> str:
        """Where the address came from, for messages."""
        if self.env_url:
            return "LABEL_STUDIO_URL"
        return "the hostname Label Studio sent in /setup"

    def _token(self) -> Tuple[Optional[str], str]:
        if self._env_token:
            if not self.env_url and not self.setup_trusted:
                # The address came from an unauthenticated /setup: anyone could have sent it.
                raise ImageError(
                    f"not sending LABEL_STUDIO_API_KEY to {self.url}: that address "
                    "was sent in a /setup request without basic auth, so anyone who can reach the "
                    "backend could have chosen it. Set LABEL_STUDIO_URL in the backend's "
                    "environment to Label Studio's address (e.g. http://label-studio:8080), or "
                    "turn on basic auth (BASIC_AUTH_USER / BASIC_AUTH_PASS) and enter it in Label "
                    "Studio's model settings"
                )
            return self._env_token, "from LABEL_STUDIO_API_KEY"
        if self._setup_token:
            if not _TOKEN_TEXT.fullmatch(self._setup_token):
                raise ImageError(_unusable("the access token Label Studio sent in /setup"))
            return self._setup_token, "sent by Label Studio in /setup"
        return None, "none configured"

    def credentials(self) -> Tuple[Optional[str], Optional[str]]:
        """Label Studio's address and the token to call its API with (a process of the backend's
        own, e.g. a training run, calls it), each None when there is none. The token goes only
        where :meth:`auth_header` would send it: an ImageError says why not otherwise."""
        with self._lock:
            token, _ = self._token()
            return self.url, token

    def trusted_bases(self) -> Tuple[Optional[str], ...]:
        """Label Studio's addresses that the network policy's allowlist always lets through."""
        return self.env_url, self.setup_url if self.setup_trusted else None

    def is_label_studio(self, url: str) -> bool:
        """Whether ``url`` is on Label Studio's host:port (the only place credentials go); an
        http -> https upgrade of Label Studio's own host counts too."""
        ls = self.url
        if ls is None:
            return False
        target, home = origin(url), origin(ls)
        if target is None or home is None:
            return False
        if target == home:
            return True
        return (target[0] == home[0] and home[1] == 80 and target[1] == 443
                and urlsplit(url).scheme.lower() == "https")

    # ---- tokens --------------------------------------------------------------------------

    def auth_header(self, force_refresh: bool = False) -> Tuple[Optional[str], str, str]:
        """(header value or None, token kind, where the token came from)."""
        token, source = self._token()
        if not token:
            return None, "none", source
        kind = token_kind(token)
        if kind == "legacy":
            return f"Token {token}", kind, source
        exp = _exp_of(jwt_payload(token))
        if exp is not None and self._clock() >= exp:
            raise ImageError(_expired(kind, source, exp))
        if kind == "access":
            return f"Bearer {token}", kind, source
        with self._lock:
            pat_id = text_digest(token)
            now = self._clock()
            stale = (
                self._access is None
                or self._access_for != pat_id
                or force_refresh
                or (self._access_exp is not None and now >= self._access_exp - self._skew())
            )
            if stale:
                self._refresh(token, source)
            return f"Bearer {self._access}", kind, source

    def headers(self, force_refresh: bool = False) -> Dict[str, str]:
        """``Authorization`` for Label Studio's API with the configured token (legacy or personal
        access token, refreshed as needed); empty when no token is configured."""
        header, _kind, _source = self.auth_header(force_refresh)
        return {"Authorization": header} if header else {}

    def _skew(self) -> float:
        if self._access_life and self._access_life > 0:
            return min(_ACCESS_TOKEN_SKEW, self._access_life / 10.0)
        return _ACCESS_TOKEN_SKEW

    def _refresh(self, pat: str, source: str) -> None:
        ls = self.url
        assert ls is not None
        url = f"{ls}/api/token/refresh/"
        logger.debug("Exchanging the personal access token (%s) for an access token at %s",
                     source, url)
        try:
            resp = self._session.post(url, json={"refresh": pat}, timeout=self._timeout,
                                      allow_redirects=False)
        except requests.RequestException as exc:
            raise messages.connection_error(exc, url, "the token refresh endpoint", self._timeout,
                                           self.url, self.url_source) from None
        with resp:
            status = resp.status_code
            if status in (400, 401, 403):
                raise ImageError(
                    f"Label Studio at {ls} rejected the personal access token {source} at "
                    f"/api/token/refresh/ (HTTP {status}): it is expired, revoked or belongs to "
                    f"another Label Studio instance. Create a new one (Label Studio -> {PAT_HOWTO}) "
                    "and set LABEL_STUDIO_API_KEY to it"
                )
            if resp.is_redirect:
                target = urljoin(url, resp.headers.get("Location", ""))
                raise ImageError(
                    f"Label Studio's /api/token/refresh/ at {ls} redirected to "
                    f"{redact_url(target)}: set LABEL_STUDIO_URL to Label Studio's final address "
                    "(scheme, host and port)"
                )
            if status in (404, 405):
                raise ImageError(
                    f"Label Studio at {ls} has no token refresh endpoint (/api/token/refresh/ "
                    f"answered HTTP {status}): it may predate personal access tokens, or "
                    f"{self.url_source} does not point to Label Studio. Check the URL, or use "
                    "a legacy API token in LABEL_STUDIO_API_KEY"
                )
            if status >= 400:
                raise ImageError(
                    f"Label Studio at {ls} failed to refresh the access token (HTTP {status} from "
                    "/api/token/refresh/); check Label Studio's logs"
                )
            try:
                access = resp.json().get("access")
            except (ValueError, AttributeError):
                access = None
        if not isinstance(access, str) or not _TOKEN_TEXT.fullmatch(access):
            raise ImageError(
                f"Label Studio at {ls} answered /api/token/refresh/ without an access token; check "
                f"that {self.url_source} points to Label Studio"
            )
        payload = jwt_payload(access)
        exp = _exp_of(payload)
        iat = payload.get("iat") if payload else None
        now = self._clock()
        self._access = access
        self._access_for = text_digest(pat)
        self._access_exp = exp
        self._access_life = (exp - iat) if exp is not None and isinstance(iat, (int, float)) else None
        if exp is not None:
            logger.info("Obtained a Label Studio access token (valid for %.0f s)", exp - now)
        else:
            logger.info("Obtained a Label Studio access token (no expiry given)")


__all__ = ["LabelStudioAccess", "jwt_payload", "token_kind"]
