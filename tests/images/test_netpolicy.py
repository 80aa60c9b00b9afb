"""Where image downloads may go, and where the Label Studio key may go: loopback servers stand in
for Label Studio, a storage and a stranger; the process's own socket audit events prove that no
connection to a refused address is even attempted."""
from __future__ import annotations

import ipaddress
import socket
import sys
import threading

import pytest

from sam_backend.errors import ConfigError, ImageError
from sam_backend.images.netpolicy import (
    DestinationRefused,
    NetworkPolicy,
    blocked_reason,
    parse_image_hosts,
)
from tests.support.loopback_hosts import LEGACY_TOKEN, FakeLabelStudio, Redirector, _Handler, rgb_png  # noqa: F401

# --------------------------------------------------------------------------------------------
# Every socket.connect of this process, from Python's audit events (a hook cannot be removed, so
# it only records while a test asks it to).

_connects: list = []
_recording = threading.Event()


def _audit(event, args):
    if event == "socket.connect" and _recording.is_set():
        _connects.append(args[1])


sys.addaudithook(_audit)


@pytest.fixture
def connects():
    """The addresses this process connects to during the test (``(host, port, ...)`` tuples)."""
    _connects.clear()
    _recording.set()
    yield _connects
    _recording.clear()


def _link_local(address) -> bool:
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%")[0])
    except (ValueError, TypeError, IndexError):
        return False
    return blocked_reason(ip) is not None


@pytest.fixture
def redirector():
    made = []

    def make(target):
        host = Redirector(target)
        made.append(host)
        return host

    yield make
    for host in made:
        host.stop()


# --------------------------------------------------------------------------------------------
# Link-local and metadata addresses

METADATA_URLS = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://169.254.1.1:8080/x.png",
    "http://[fe80::1]/x.png",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    # not address literals to Python, but the resolver turns them into 169.254.169.254: caught
    # where the connection resolves the name, before it connects
    "http://2852039166/latest/meta-data/",
    "http://0xa9.0xfe.0xa9.0xfe/latest/meta-data/",
]


@pytest.mark.parametrize("url", METADATA_URLS)
def test_metadata_addresses_are_refused_before_any_connection(url, make_loader, connects):
    loader = make_loader()
    with pytest.raises(DestinationRefused) as err:
        loader.load(url)
    message = str(err.value)
    assert isinstance(err.value, ImageError)  # a 400 for the annotator, the server keeps serving
    assert "link-local" in message or "metadata" in message
    assert "allow_link_local_images=true" in message
    assert connects == []  # not a single connection attempt, anywhere


def test_redirect_to_metadata_address_is_refused(redirector, make_loader, connects):
    hop = redirector("http://169.254.169.254/latest/meta-data/iam/security-credentials/")
    loader = make_loader()
    with pytest.raises(DestinationRefused) as err:
        loader.load(hop.url + "/cat.png")
    message = str(err.value)
    assert "169.254.169.254" in message and "link-local" in message
    assert hop.url.split("//")[1] in message  # names the image the task asked for
    assert hop.paths == ["/cat.png"]
    assert connects and not any(_link_local(a) for a in connects)


def test_redirect_from_label_studio_presign_to_metadata_is_refused(ls, make_loader, connects):
    ls.cloud["s3://bucket/cat.jpg"] = "http://[::ffff:169.254.169.254]/latest/meta-data/"
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    with pytest.raises(DestinationRefused, match="link-local"):
        loader.load("s3://bucket/cat.jpg", task_id=3)
    assert ls.count("/tasks/3/presign/") == 1
    assert not any(_link_local(a) for a in connects)


def test_addresses_are_checked_where_the_connection_resolves_them(storage, make_loader, connects,
                                                                   monkeypatch):
    """DNS rebinding: a name that resolves to a harmless address at first and to the metadata
    address later. The check runs on the answer the connection itself got and connects to exactly
    that checked address. (Name resolution is the one thing simulated here: this machine's DNS
    cannot be told to rebind.)"""
    answers = iter(["127.0.0.1", "169.254.169.254"])
    real = socket.getaddrinfo

    def resolver(host, port, *args, **kwargs):
        if host == "images.example":
            return real(next(answers), port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    port = storage.url.rsplit(":", 1)[1]
    loader = make_loader()
    assert loader.load(f"http://images.example:{port}/public/pic.png")[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(DestinationRefused, match=r"images\.example \(169\.254\.169\.254\)"):
        loader.load(f"http://images.example:{port}/public/pic.png?again=1")
    assert len(storage.headers) == 1
    assert [a[0] for a in connects] == ["127.0.0.1"]


def test_loopback_and_private_addresses_stay_allowed_and_the_option_lifts_the_block():
    policy = NetworkPolicy()
    for address in ("127.0.0.1", "::1", "10.1.2.3", "172.16.0.9", "192.168.1.20", "fd12::5",
                    "::ffff:10.0.0.1", "8.8.8.8"):
        policy.check_addresses("h", [address])
    with pytest.raises(DestinationRefused):
        policy.check_addresses("h", ["10.0.0.1", "169.254.169.254"])  # any bad answer refuses
    NetworkPolicy(allow_link_local=True).check_addresses("h", ["169.254.169.254", "fe80::1"])


def test_setting_from_the_environment():
    from sam_backend.images.config import ImageAccessSettings
    from sam_backend.settings import Settings

    backend = Settings.load({}, environ={"ALLOW_LINK_LOCAL_IMAGES": "true",
                                         "IMAGE_HOSTS": "a.example, *.b.example"})
    settings = ImageAccessSettings.from_settings(backend)
    assert settings.allow_link_local is True and settings.image_hosts == "a.example, *.b.example"
    assert ImageAccessSettings.from_settings(backend, allow_link_local=False).allow_link_local \
        is False


# --------------------------------------------------------------------------------------------
# The image_hosts allowlist


def test_image_hosts_allowlist(ls, storage, make_loader, connects):
    storage_port = int(storage.url.rsplit(":", 1)[1])
    locked = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN,
                         image_hosts="images.example.com, *.cdn.example")
    with pytest.raises(DestinationRefused) as err:
        locked.load(storage.url + "/public/pic.png")
    message = str(err.value)
    assert "image_hosts" in message and f"127.0.0.1:{storage_port}" in message
    assert storage.headers == []
    # Label Studio itself is always allowed ...
    locked.load("/data/upload/1/y.png")
    assert ls.count("/data/upload/1/y.png") == 1
    # ... but not where it redirects to, unless listed
    ls.cloud["s3://bucket/cat.jpg"] = storage.presigned("/bucket/cat.jpg")
    with pytest.raises(DestinationRefused, match="image_hosts"):
        locked.load("s3://bucket/cat.jpg", task_id=2)
    assert storage.headers == []
    assert all(a[1] != storage_port for a in connects)

    listed = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN,
                         image_hosts=f"images.example.com, 127.0.0.1:{storage_port}")
    assert listed.load(storage.url + "/public/pic.png")[0, 0].tolist() == [1, 2, 3]
    listed.load("s3://bucket/cat.jpg", task_id=2)
    assert len(storage.headers) == 2


def test_image_hosts_patterns():
    (a, b, c, d) = parse_image_hosts("Images.Example.com, *.cdn.example, 10.0.0.5:8080, [::1]:9000")
    assert a.matches("images.example.com", 443) and not a.matches("x.images.example.com", 80)
    policy = NetworkPolicy(image_hosts="images.example.com.")
    policy.check_url("https://IMAGES.example.com./a.png")  # case and a trailing dot do not matter
    with pytest.raises(DestinationRefused):
        policy.check_url("https://images.example.com.evil.example/a.png")
    assert b.matches("eu.cdn.example", 80) and not b.matches("cdn.example", 80)
    assert not b.matches("evilcdn.example", 80)
    assert c.matches("10.0.0.5", 8080) and not c.matches("10.0.0.5", 80)
    assert d.matches("::1", 9000) and d.matches("0:0::1", 9000)
    assert parse_image_hosts("") == () and parse_image_hosts(None) == ()
    for bad in ("http://a.example/", "a.example/path", "ex*ample.com", "user@host"):
        with pytest.raises(ConfigError, match="image_hosts"):
            parse_image_hosts(bad)


# --------------------------------------------------------------------------------------------
# The Label Studio key goes only where the operator said


class Stranger(FakeLabelStudio):
    """Someone else's server that answers like Label Studio and records every request."""


@pytest.fixture
def stranger(clock):
    host = Stranger(clock)
    host.files["/data/upload/1/a.png"] = (rgb_png(), "image/png")
    yield host
    host.stop()


def test_key_is_not_sent_to_a_hostname_from_an_unauthenticated_setup(stranger, make_loader):
    loader = make_loader(api_key=LEGACY_TOKEN)  # LABEL_STUDIO_URL not set
    loader.update_from_setup(stranger.url, None, authenticated=False)
    for url in ("/data/upload/1/a.png", stranger.url + "/data/upload/1/a.png",
                stranger.url + "/anything.png"):
        with pytest.raises(ImageError) as err:
            loader.load(url)
        message = str(err.value)
        assert "LABEL_STUDIO_URL" in message and "basic auth" in message
        assert LEGACY_TOKEN not in message
    assert stranger.requests == []


def test_key_goes_to_a_hostname_from_an_authenticated_setup(ls, make_loader):
    loader = make_loader(api_key=LEGACY_TOKEN)
    loader.update_from_setup(ls.url, None, authenticated=True)
    loader.load("/data/upload/1/y.png")
    assert ls.requests[-1][1:] == ("/data/upload/1/y.png", f"Token {LEGACY_TOKEN}")
    # a later /setup without basic auth takes the trust away again
    loader.update_from_setup(ls.url, None, authenticated=False)
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL"):
        loader.load("/data/upload/1/x.jpg")
    assert ls.count("/data/upload/1/x.jpg") == 0


def test_pinned_url_wins_over_any_setup(ls, stranger, make_loader):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    loader.update_from_setup(stranger.url, "strangers-own-token", authenticated=False)
    loader.load("/data/upload/1/y.png")
    assert ls.requests[-1][2] == f"Token {LEGACY_TOKEN}"
    assert stranger.requests == []


def test_token_sent_in_setup_keeps_working_without_an_api_key(ls, make_loader):
    loader = make_loader()  # neither LABEL_STUDIO_URL nor LABEL_STUDIO_API_KEY
    loader.update_from_setup(ls.url, LEGACY_TOKEN, authenticated=False)
    loader.load("/data/upload/1/y.png")
    assert ls.requests[-1][2] == f"Token {LEGACY_TOKEN}"
