"""HTTP layer: basic auth for the routes, the way Label Studio's "Connect Model" dialog sends it.

Label Studio 1.23 stores a user and password with an ML backend (Settings -> Model -> Connect
Model -> "Use basic auth") and adds them as ``Authorization: Basic ...`` to every request it makes
to the backend. label-studio-ml's own server expects the pair in ``BASIC_AUTH_USER`` /
``BASIC_AUTH_PASS``; this backend reads the same variables (and the ``basic_auth_user`` /
``basic_auth_pass`` options).

With both set, every route answers 401 with ``WWW-Authenticate: Basic`` unless the request carries
them, except ``GET /health`` asked without any credentials: it answers the bare liveness
``{"status": "UP"}`` (for load balancers and container health checks; the details need
credentials). ``GET /health`` with wrong credentials is a 401 like everything else, which is what
makes Label Studio's Connect Model dialog say that the credentials are wrong. Both parts are
compared in constant time. The password is never logged.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
from typing import Optional

from sam_backend.settings import check_basic_auth

log = logging.getLogger(__name__)

REALM = "sam_backend"


class BasicAuth:
    """The expected user and password; ``enabled`` is False when neither is set."""

    def __init__(self, user: Optional[str] = None, password: Optional[str] = None):
        user = user or None
        password = password or None
        check_basic_auth(user, password)  # both or neither
        # Only digests are kept: equal-length values for compare_digest, and no plain password
        # in the object (a repr or a traceback cannot show it).
        self._user = _digest(user) if user is not None else None
        self._password = _digest(password) if password is not None else None
        self.user = user

    @property
    def enabled(self) -> bool:
        return self._user is not None

    def __repr__(self) -> str:
        return f"BasicAuth(user={self.user!r}, password={'***' if self.enabled else None})"

    def check(self, authorization: Optional[str]) -> bool:
        """Whether an ``Authorization`` header value carries the right user and password.

        Always True when auth is off. Both parts are compared, in constant time, whatever the
        outcome of the first."""
        if not self.enabled:
            return True
        user, password = parse_basic(authorization)
        user_ok = hmac.compare_digest(_digest(user or ""), self._user)
        password_ok = hmac.compare_digest(_digest(password or ""), self._password)
        return user is not None and user_ok & password_ok


def parse_basic(authorization: Optional[str]):
    """``"Basic base64(user:pass)"`` -> (user, password); (None, None) if not basic auth."""
    if not authorization:
        return None, None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None, None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None, None
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        text = decoded.decode("latin-1")
    user, sep, password = text.partition(":")
    if not sep:
        return None, None
    return user, password


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def install(app, auth: BasicAuth, error) -> None:
    """Enforce ``auth`` on every route of the Flask ``app`` except the bare ``/health`` answer.

    ``error(message, status)`` builds the JSON error response. ``flask.g.authenticated`` tells
    a route whether the request came with valid credentials (always True with auth off)."""
    from flask import g, request

    if auth.enabled:
        log.info("HTTP basic auth is on (user %r): requests without it are refused", auth.user)
    else:
        log.info("HTTP basic auth is off: anyone who can reach this port can use the backend "
                 "(set BASIC_AUTH_USER and BASIC_AUTH_PASS to require credentials)")

    @app.before_request
    def require_basic_auth():
        header = request.headers.get("Authorization")
        g.authenticated = auth.check(header)
        if g.authenticated or (not header and request.endpoint == "health"
                               and request.method in ("GET", "HEAD")):
            return None
        given = "wrong credentials" if header else "no credentials"
        log.warning("%s %s refused: %s (from %s)", request.method, request.path, given,
                    request.remote_addr)
        response = error(
            ("the basic auth user or password is wrong" if header else "authentication required")
            + ": this backend needs HTTP basic auth. In Label Studio open "
            "the project's Settings -> Model, edit the model, switch on 'Use basic auth' and enter "
            "the user and password the backend was started with (BASIC_AUTH_USER / "
            "BASIC_AUTH_PASS)", 401)
        response.headers["WWW-Authenticate"] = f'Basic realm="{REALM}", charset="UTF-8"'
        return response
