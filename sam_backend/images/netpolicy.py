"""Where image downloads may go: no link-local / cloud-metadata addresses, an optional host allowlist.

A task's image URL is chosen by whoever writes tasks, and every redirect hop by whoever answers;
without a check the backend would fetch ``http://169.254.169.254/...`` (a cloud instance's
metadata service, which hands out credentials) on anyone's behalf. :class:`NetworkPolicy` refuses:

* **link-local and metadata addresses** -- ``169.254.0.0/16``, ``fe80::/10``, the same IPv4
  addresses written as IPv6 (IPv4-mapped ``::ffff:169.254.x.x``, IPv4-compatible ``::169.254.x.x``,
  NAT64 ``64:ff9b::/96``, 6to4 ``2002:a9fe::/32``), and the metadata addresses outside that range
  (AWS ``fd00:ec2::254``, Alibaba Cloud ``100.100.100.200``) -- unless ``allow_link_local`` is set;
* with an **allowlist** (``image_hosts``), every host that is not on it and is not Label Studio's.

Loopback and private networks stay allowed: Label Studio usually runs there.

The address check sits in the connection layer (:func:`mount`): the connection resolves the host
name itself, checks every address it got, and connects only to those checked addresses. So a DNS
name that first resolves to a harmless address and then to a metadata address (DNS rebinding)
cannot slip through between a check and the connect. Through an HTTP proxy the proxy resolves the
name; :meth:`NetworkPolicy.check_url` then resolves and checks the name beforehand (best effort).
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection as urllib3_connection
from urllib3.util.retry import Retry
from urllib3.util.timeout import Timeout

from sam_backend.errors import ConfigError, ImageError

log = logging.getLogger(__name__)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

LINK_LOCAL_V4 = ipaddress.ip_network("169.254.0.0/16")
LINK_LOCAL_V6 = ipaddress.ip_network("fe80::/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Metadata services that are not link-local.
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("fd00:ec2::254"),
                                ipaddress.ip_address("100.100.100.200")})


class DestinationRefused(ImageError):
    """A download the network policy does not allow; raised before any connection is made."""


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 address stands for (mapped, compatible, NAT64, 6to4), if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    packed = addr.packed
    if addr in _NAT64 or (packed[:12] == bytes(12) and int(addr) > 0xFFFF):
        return ipaddress.IPv4Address(packed[12:])
    return None


def blocked_reason(addr: IPAddress) -> Optional[str]:
    """Why ``addr`` is a link-local / metadata address, or None when it is not one."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            addr = ipaddress.IPv6Address(str(addr).split("%", 1)[0])
        if addr in METADATA_ADDRESSES:
            return f"{addr} is a cloud metadata address"
        if addr in LINK_LOCAL_V6:
            return f"{addr} is an IPv6 link-local address (fe80::/10)"
        v4 = _embedded_ipv4(addr)
        if v4 is not None:
            inner = blocked_reason(v4)
            return f"{addr} is {v4} written as IPv6, and {inner}" if inner else None
        return None
    if addr in METADATA_ADDRESSES:
        return f"{addr} is a cloud metadata address"
    if addr in LINK_LOCAL_V4:
        what = " (the cloud metadata service)" if str(addr) == "169.254.169.254" else ""
        return f"{addr} is a link-local address{what} (169.254.0.0/16)"
    return None


def _parse_ip(text: str) -> Optional[IPAddress]:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True)
class _HostPattern:
    host: str  # lower case, no brackets; "*.example.com" matches subdomains only
    port: Optional[int]

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        ip, mine = _parse_ip(host), _parse_ip(self.host)
        if ip is not None and mine is not None:
            return ip == mine
        return host == self.host


def parse_image_hosts(value: Union[None, str, Iterable[str]]) -> Tuple[_HostPattern, ...]:
    """``"a.example.com, *.s3.amazonaws.com, 10.0.0.5:8080, [::1]:9000"`` -> patterns.

    An entry is a host name or IP address, optionally with ``:port``; ``*.domain`` matches every
    subdomain of ``domain``. Empty -> no allowlist."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    patterns = []
    for raw in items:
        entry = str(raw).strip().lower()
        if not entry:
            continue
        if "://" in entry or "/" in entry or "@" in entry:
            raise ConfigError(f"image_hosts entry {raw!r}: give a host name or address with an "
                              "optional :port (e.g. images.example.com, *.example.com, "
                              "10.0.0.5:8080), not a URL")
        try:
            parts = urlsplit("//" + entry)
            host, port = parts.hostname, parts.port
        except ValueError:
            raise ConfigError(f"image_hosts entry {raw!r} is not a host[:port]") from None
        host = (host or "").rstrip(".")
        if not host:
            raise ConfigError(f"image_hosts entry {raw!r} has no host")
        if host.startswith("*") and not host.startswith("*.") or "*" in host[1:]:
            raise ConfigError(f"image_hosts entry {raw!r}: a wildcard is only allowed as a "
                              "leading '*.' (e.g. *.example.com)")
        patterns.append(_HostPattern(host, port))
    return tuple(patterns)


def _origin(url: str) -> Tuple[str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return (parts.hostname or "").lower().rstrip("."), port


class NetworkPolicy:
    """What image downloads may reach (module docstring). Thread-safe (immutable)."""

    def __init__(self, allow_link_local: bool = False,
                 image_hosts: Union[None, str, Iterable[str]] = None):
        self.allow_link_local = bool(allow_link_local)
        self.image_hosts = parse_image_hosts(image_hosts)

    def __repr__(self) -> str:
        hosts = ",".join(p.host + (f":{p.port}" if p.port else "") for p in self.image_hosts)
        return (f"NetworkPolicy(allow_link_local={self.allow_link_local}, "
                f"image_hosts={hosts or None!r})")

    # -- addresses (the connection layer) ------------------------------------------------------
    def check_addresses(self, host: str, addresses: Sequence[str]) -> None:
        """Raise :class:`DestinationRefused` when any address ``host`` resolved to is refused."""
        if self.allow_link_local:
            return
        for text in addresses:
            addr = _parse_ip(text)
            reason = blocked_reason(addr) if addr is not None else None
            if reason:
                where = host if _parse_ip(host) is not None else f"{host} ({text})"
                raise DestinationRefused(
                    f"refused to connect to {where}: {reason}. Image "
                    "downloads never go to link-local or cloud metadata addresses; if this "
                    "really is where the images are, start the backend with "
                    "allow_link_local_images=true")

    def resolve(self, host: str, port: int) -> List[Tuple[int, int, int, tuple]]:
        """``getaddrinfo`` for ``host`` (IPv4/IPv6 as urllib3 allows), checked; the entries to
        connect to, in order, without duplicates."""
        infos = socket.getaddrinfo(host, port, urllib3_connection.allowed_gai_family(),
                                   socket.SOCK_STREAM)
        seen, out = set(), []
        for family, socktype, proto, _canon, sockaddr in infos:
            if sockaddr[0] in seen:
                continue
            seen.add(sockaddr[0])
            out.append((family, socktype, proto, sockaddr))
        self.check_addresses(host, [entry[3][0] for entry in out])
        return out

    # -- URLs (before a request) ---------------------------------------------------------------
    def check_url(self, url: str, trusted: Iterable[Optional[str]] = (),
                  resolve: bool = False) -> None:
        """Refuse ``url`` before any request: a host not on the allowlist (``trusted`` base
        URLs -- Label Studio's -- are always allowed), an address literal that is link-local;
        with ``resolve`` (a proxy will connect for us), the name's addresses too."""
        host, port = _origin(url)
        if self.image_hosts:
            allowed = any(_origin(t) == (host, port) for t in trusted if t) or any(
                p.matches(host, port) for p in self.image_hosts)
            if not allowed:
                listed = ", ".join(p.host + (f":{p.port}" if p.port else "")
                                   for p in self.image_hosts)
                raise DestinationRefused(
                    f"refused to download from {host}:{port}: it is not in image_hosts "
                    f"({listed}) and not Label Studio's address. Add it to image_hosts if "
                    "images may come from there")
        literal = _parse_ip(host)
        if literal is not None:
            self.check_addresses(host, [str(literal)])
        elif resolve and not self.allow_link_local:
            try:
                self.resolve(host, port)
            except socket.gaierror:
                pass  # the proxy may know names we do not; it reports failures itself


SocketWatch = Callable[[socket.socket], None]


def _guarded(base: type, policy: NetworkPolicy, watch: Optional[SocketWatch] = None) -> type:
    """A urllib3 connection class that connects only to addresses ``policy`` checked, and hands
    ``watch`` every socket it sends a request on: a new one as soon as it is connected (before
    any TLS handshake), a kept-alive one before each request."""

    def _new_conn(self):
        sock = _connect(self)
        if watch is not None:
            watch(sock)
        return sock

    def request(self, *args, **kwargs):
        if watch is not None and self.sock is not None:  # a kept-alive connection, used again
            watch(self.sock)
        return base.request(self, *args, **kwargs)

    def _connect(self):
        try:
            targets = policy.resolve(self._dns_host, self.port)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        error: Optional[Exception] = None
        for _family, _socktype, _proto, sockaddr in targets:
            try:
                # An address literal: getaddrinfo inside does no DNS lookup, so the socket
                # connects to exactly the address that was checked.
                sock = urllib3_connection.create_connection(
                    (sockaddr[0], self.port), self.timeout, source_address=self.source_address,
                    socket_options=self.socket_options)
            except socket.timeout as exc:
                error = ConnectTimeoutError(
                    self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})")
                error.__cause__ = exc
            except OSError as exc:
                error = NewConnectionError(self, f"Failed to establish a new connection: {exc}")
                error.__cause__ = exc
            else:
                return sock
        if error is None:
            error = NewConnectionError(self, f"Failed to establish a new connection: "
                                             f"{self.host} has no address")
        raise error

    return type(f"Guarded{base.__name__}", (base,), {"_new_conn": _new_conn, "request": request})


def _capped(timeout, left: float) -> Timeout:
    """``timeout`` (a urllib3 Timeout, a number or None) with each part cut to ``left`` seconds."""
    if not isinstance(timeout, Timeout):
        timeout = Timeout(connect=timeout, read=timeout)

    def cap(value):
        return min(value, left) if isinstance(value, (int, float)) else left

    return Timeout(connect=cap(timeout.connect_timeout), read=cap(timeout.read_timeout))


def _pool(base: type, connection: type, policy: NetworkPolicy,
          time_left: Optional[Callable[[], Optional[float]]],
          watch: Optional[SocketWatch] = None) -> type:
    """A urllib3 connection pool of guarded connections (their sockets handed to ``watch``) whose
    every attempt (the first and each retry) gets timeouts no longer than ``time_left()``."""

    def urlopen(self, method, url, *args, **kwargs):
        left = time_left() if time_left is not None else None
        if left is not None:
            kwargs["timeout"] = _capped(kwargs.get("timeout"), max(left, 0.001))
        return base.urlopen(self, method, url, *args, **kwargs)

    return type(f"Guarded{base.__name__}", (base,),
                {"ConnectionCls": _guarded(connection, policy, watch), "urlopen": urlopen})


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, policy: NetworkPolicy, time_left=None, watch=None, **kwargs):
        self._policy = policy
        self._time_left = time_left
        self._watch = watch
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _pool(HTTPConnectionPool, HTTPConnection, self._policy, self._time_left,
                          self._watch),
            "https": _pool(HTTPSConnectionPool, HTTPSConnection, self._policy, self._time_left,
                           self._watch)}


def mount(session: requests.Session, policy: NetworkPolicy, retries: Union[int, Retry] = 0,
          time_left: Optional[Callable[[], Optional[float]]] = None,
          watch: Optional[SocketWatch] = None) -> requests.Session:
    """Make every http(s) connection ``session`` opens obey ``policy``; returns ``session``.
    ``retries``: urllib3's retry policy for its requests (0: none, as requests does by default).
    ``time_left``: the seconds the current request may still take, or None (no bound): every
    attempt's connect and read timeouts are cut to it, so that retries stay within a deadline.
    ``watch``: called with every socket a request is sent on (new: before its TLS handshake;
    kept-alive: before the request), so that a deadline can shut it down whatever http.client
    has done with it meanwhile (it takes the socket off the connection of an answer that closes
    the connection, such as any HTTP/1.0 answer)."""
    adapter = _GuardedAdapter(policy, time_left, watch,
                              max_retries=retries if retries else Retry(0, read=False))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def proxied(session: requests.Session, url: str) -> bool:
    """Whether ``session`` sends a request for ``url`` through a proxy (environment settings)."""
    try:
        settings = session.merge_environment_settings(url, {}, None, None, None)
    except Exception:  # noqa: BLE001 - unusual environment: assume a proxy, check more
        return True
    scheme = urlsplit(url).scheme.lower()
    proxies = settings.get("proxies") or {}
    return bool(proxies.get(scheme) or proxies.get("all"))


__all__ = ["DestinationRefused", "NetworkPolicy", "blocked_reason", "mount",
           "parse_image_hosts", "proxied"]
