"""Only Label Studio gets in: the backend started as users start it (`label-studio-ml start sam`),
probed the way an attacker on the same network would, next to loopback servers playing Label
Studio and a stranger's server that records every request it gets."""
from __future__ import annotations

import base64
import io

import pytest
import requests
from PIL import Image

from sam_backend.errors import ConfigError
from tests.support.random_weights import synthetic_image
from sam_backend.settings import Settings
from tests.support.server_utils import REPO, BackendProcess, free_port
from tests.support.loopback_hosts import LEGACY_TOKEN, Clock, FakeLabelStudio, Redirector
from tests.support.payloads import FULL_CONFIG, H, W, keypoint, payload

USER = "label-studio"
PASSWORD = "Pw-8f3kq!zx-S3cret-\u00fc"  # one Latin-1 letter: requests sends basic auth in Latin-1
SETUP_TOKEN = "5e7d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a6f7e8d"
UPLOAD = "/data/upload/1/scene.png"


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(H, W, seed=5)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def fake_ls():
    host = FakeLabelStudio(Clock())
    host.files[UPLOAD] = (png_bytes(), "image/png")
    yield host
    host.stop()


@pytest.fixture(scope="module")
def stranger():
    host = FakeLabelStudio(Clock())  # answers like Label Studio would; records every request
    host.files[UPLOAD] = (png_bytes(), "image/png")
    yield host
    host.stop()


def start_backend(checkpoint, tmp_path_factory, env):
    port = free_port()
    base = {"LABEL_STUDIO_URL": "", "LABEL_STUDIO_HOST": "",  # not pinned: learned from /setup
            "LABEL_STUDIO_API_KEY": LEGACY_TOKEN, "LOG_LEVEL": "DEBUG",
            "SAM_BACKEND_IMAGE_CACHE_DIR": str(tmp_path_factory.mktemp("imgcache")),
            "http_proxy": "", "https_proxy": "", "HTTP_PROXY": "", "HTTPS_PROXY": ""}
    process = BackendProcess(
        ["label-studio-ml", "start", "sam", "--with", "model_name=mobile_sam",
         f"sam_checkpoint_file={checkpoint}", "device=cpu", "runtime=torch",
         "-p", str(port), "--host", "127.0.0.1"],
        port, {**base, **env}, tmp_path_factory.mktemp("logs") / "backend.log")
    return process.start()


def pinned(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(name.lower() + "=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} is not pinned in constraints.txt")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode("latin-1")).decode()


def setup_body(hostname, token=None):
    return {"project": "1.1700000000", "schema": FULL_CONFIG, "hostname": hostname,
            "access_token": token, "extra_params": None}


def no_prompt():
    body = payload([])
    body["params"]["context"] = None
    return body


ROUTES = [
    ("POST", "/predict", no_prompt),
    ("POST", "/setup", lambda: setup_body(None)),
    ("POST", "/webhook", lambda: {"action": "ANNOTATION_CREATED", "project": {"id": 1}}),
    ("GET", "/train/status?project=1", None),
    ("GET", "/versions", None),
    ("POST", "/versions", lambda: {"project": "1"}),
    ("GET", "/metrics", None),
]


@pytest.fixture(scope="class")
def auth_backend(checkpoint_factory, tmp_path_factory):
    """A backend with basic auth on (class scope: one backend process alive at a time)."""
    process = start_backend(checkpoint_factory("mobile_sam"), tmp_path_factory,
                            {"BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD})
    yield process
    process.stop()


@pytest.fixture(scope="class")
def open_backend(checkpoint_factory, tmp_path_factory):
    """A backend without basic auth."""
    process = start_backend(checkpoint_factory("mobile_sam"), tmp_path_factory, {})
    yield process
    process.stop()


@pytest.mark.process
class TestWithBasicAuth:
    @pytest.fixture
    def backend(self, auth_backend):
        return auth_backend

    @pytest.mark.parametrize("method,path,body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
    def test_every_route_needs_the_credentials(self, backend, method, path, body):
        def call(header=None, **kw):
            headers = {"Authorization": header} if header else {}
            return requests.request(method, backend.url + path, headers=headers, timeout=30,
                                    json=body() if body else None, **kw)

        for wrong in (None, basic(USER, "wrong"), basic("someone", PASSWORD),
                      basic(USER, PASSWORD + "x"), "Bearer " + PASSWORD, "Basic !!!"):
            response = call(wrong)
            assert response.status_code == 401, (wrong, response.text)
            assert response.headers["WWW-Authenticate"].startswith('Basic realm="sam_backend"')
            message = response.json()["errors"][0]
            assert "basic auth" in message and "BASIC_AUTH_USER" in message
            assert "basic auth" in response.reason  # what Label Studio shows
        response = call(basic(USER, PASSWORD))
        assert response.status_code == 200, response.text
        # requests' own basic auth (Latin-1), as Label Studio's connector sends it
        assert call(auth=(USER, PASSWORD)).status_code == 200

    def test_health_answers_liveness_only_without_credentials(self, backend):
        bare = requests.get(backend.url + "/health", timeout=5)
        assert bare.status_code == 200 and bare.json() == {"status": "UP"}
        full = requests.get(backend.url + "/health", auth=(USER, PASSWORD), timeout=5).json()
        assert full["status"] == "UP" and full["model"] == "mobile_sam/vit_t"
        assert requests.post(backend.url + "/health", timeout=5).status_code == 401
        # wrong credentials are refused here too: Label Studio's Connect Model dialog then says so
        wrong = requests.get(backend.url + "/health", auth=(USER, "wrong"), timeout=5)
        assert wrong.status_code == 401 and "model" not in wrong.json()
        assert "user or password is wrong" in wrong.json()["errors"][0]

    def test_key_goes_to_the_hostname_of_an_authenticated_setup(self, backend, fake_ls, stranger):
        auth = (USER, PASSWORD)
        # a stranger's /setup is refused before it can point the backend anywhere
        refused = requests.post(backend.url + "/setup", json=setup_body(stranger.url), timeout=5)
        assert refused.status_code == 401
        ok = requests.post(backend.url + "/setup", json=setup_body(fake_ls.url, SETUP_TOKEN),
                           auth=auth, timeout=5)
        assert ok.status_code == 200, ok.text
        click = payload([keypoint(40.0, 50.0)], data={"image": UPLOAD})
        response = requests.post(backend.url + "/predict", json=click, auth=auth, timeout=120)
        assert response.status_code == 200, response.text
        kinds = {r["type"] for r in response.json()["results"][0]["result"]}
        assert "brushlabels" in kinds
        assert ("GET", UPLOAD, f"Token {LEGACY_TOKEN}") in fake_ls.requests
        assert stranger.requests == []

    def test_no_password_key_or_token_in_the_debug_log(self, backend, fake_ls):
        # every kind of attempt, right and wrong, then read what the backend logged
        for auth in (None, (USER, PASSWORD), (USER, "typo-" + PASSWORD)):
            requests.post(backend.url + "/setup", json=setup_body(fake_ls.url, SETUP_TOKEN),
                          auth=auth, timeout=5)
            requests.post(backend.url + "/predict", auth=auth, timeout=120, json=payload(
                [keypoint(30.0, 30.0)], data={"image": "/data/upload/1/missing.png"}))
        log = backend.log_path.read_text(encoding="utf-8", errors="replace")
        assert "[DEBUG]" in log and "refused: wrong credentials" in log
        assert "Image /data/upload/1/missing.png: GET" in log  # fetches logged at DEBUG
        for secret in (PASSWORD, "typo-" + PASSWORD, LEGACY_TOKEN, SETUP_TOKEN,
                       basic(USER, PASSWORD).split(" ", 1)[1],
                       basic(USER, "typo-" + PASSWORD).split(" ", 1)[1]):
            assert secret not in log
        assert PASSWORD.encode("utf-8") not in backend.log_path.read_bytes()


@pytest.mark.process
class TestWithoutBasicAuth:
    """The attack of the issue against a backend with a key and no pinned Label Studio URL."""

    @pytest.fixture
    def backend(self, open_backend):
        return open_backend

    def test_a_stranger_setup_gets_nothing(self, backend, stranger):
        setup = requests.post(backend.url + "/setup", json=setup_body(stranger.url), timeout=5)
        assert setup.status_code == 200  # no basic auth configured: anyone may call /setup ...
        for image in (UPLOAD, stranger.url + UPLOAD):
            response = requests.post(backend.url + "/predict", timeout=60, json=payload(
                [keypoint(40.0, 50.0)], data={"image": image}))
            assert response.status_code == 400, response.text
            message = response.json()["errors"][0]
            assert "LABEL_STUDIO_URL" in message and "not sending LABEL_STUDIO_API_KEY" in message
            assert LEGACY_TOKEN not in response.text
        assert stranger.requests == []  # ... but the key never reaches the stranger
        assert backend.running

    @pytest.mark.parametrize("image", [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[fe80::a9fe:a9fe]/latest/meta-data/",
        "http://2852039166/latest/meta-data/",
    ])
    def test_metadata_image_is_refused_with_a_clear_400(self, backend, image):
        response = requests.post(backend.url + "/predict", timeout=60, json=payload(
            [keypoint(40.0, 50.0)], data={"image": image}))
        assert response.status_code == 400, response.text
        message = response.json()["errors"][0]
        assert "refused to connect" in message and "link-local" in message
        assert "allow_link_local_images=true" in message
        assert "link-local" in response.reason

    def test_redirect_to_metadata_is_refused(self, backend):
        hop = Redirector("http://169.254.169.254/latest/meta-data/")
        try:
            response = requests.post(backend.url + "/predict", timeout=60, json=payload(
                [keypoint(40.0, 50.0)], data={"image": hop.url + "/cat.png"}))
        finally:
            hop.stop()
        assert response.status_code == 400, response.text
        assert "169.254.169.254" in response.json()["errors"][0]
        assert hop.paths == ["/cat.png"]
        assert backend.running

    def test_label_studio_ml_start_serves_the_maintained_web_stack(self, backend):
        """`label-studio-ml start sam` (the fixture starts it so) runs on the pinned Flask and
        Werkzeug, not on the releases label-studio-ml 1.0.9 pins (Flask 1.1.2, Werkzeug 2.0.2),
        served by the pinned waitress (not Werkzeug's development server)."""
        from importlib.metadata import version

        stale = "this venv does not match constraints.txt: run bash scripts/setup.sh"
        server = requests.get(backend.url + "/health", timeout=5).headers["Server"]
        assert server == "waitress", (server, stale)
        assert version("waitress") == pinned("waitress"), stale
        assert version("werkzeug") == pinned("Werkzeug"), stale
        assert version("flask") == pinned("Flask"), stale
        assert int(pinned("Werkzeug")[0]) >= 3 and int(pinned("Flask")[0]) >= 3


def test_options_and_their_checks(monkeypatch):
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "IMAGE_HOSTS", "ALLOW_LINK_LOCAL_IMAGES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BASIC_AUTH_USER", "u")
    monkeypatch.setenv("BASIC_AUTH_PASS", "p")
    settings = Settings.load({"image_hosts": "a.example,*.b.example",
                              "allow_link_local_images": "true"})
    assert (settings.basic_auth_user, settings.basic_auth_pass) == ("u", "p")
    assert settings.allow_link_local_images is True
    assert "basic_auth_pass" not in repr(settings)  # a logged Settings never shows it
    monkeypatch.delenv("BASIC_AUTH_PASS")
    with pytest.raises(ConfigError, match="BASIC_AUTH_PASS"):
        Settings.load()
    with pytest.raises(ConfigError, match="image_hosts"):
        Settings.load({"basic_auth_pass": "p", "image_hosts": "http://a.example/"})
