"""Parsing option values and showing URLs safely: one implementation each for the package."""
from __future__ import annotations

from typing import Any, Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

from sam_backend.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(name: str, value: Any) -> bool:
    """An option value as a bool: true/false, 1/0, yes/no, on/off (any case); ``bool`` and 0/1
    as they are. Raises ConfigError naming ``name`` for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean: use true or false")


def is_true(value: Any) -> bool:
    """Lenient truth of a value that is not an option (an XML attribute, an env flag): only the
    true words count, anything else is false."""
    return str(value).strip().lower() in _TRUE


def redact_url(url: Any, keep_query: Iterable[str] = ("d", "fileuri")) -> str:
    """``url`` safe to log or show: the password (or a lone user token) as ``***``, query values
    other than ``keep_query`` as ``***``, the fragment dropped, ``data:`` URLs shortened."""
    if not isinstance(url, str):
        return repr(type(url))
    if url[:5].lower() == "data:":
        return f"{url.split(',', 1)[0]},...({len(url)} chars)"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _password = userinfo.partition(":")
        netloc = (f"{user}:***@" if sep else "***@") + host
    keep = {k.lower() for k in keep_query}
    pieces = []
    for piece in parts.query.split("&") if parts.query else []:
        key, sep, _value = piece.partition("=")
        pieces.append(f"{key}=***" if sep and unquote(key).lower() not in keep else piece)
    return urlunsplit((parts.scheme, netloc, parts.path, "&".join(pieces), ""))
