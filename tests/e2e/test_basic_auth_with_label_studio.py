"""A real Label Studio 1.23.2 and a backend that requires HTTP basic auth.

Registered with the credentials (what the Connect Model dialog's "Use basic auth" stores: the ML
backend record's ``auth_method`` "BASIC_AUTH", ``basic_auth_user``, ``basic_auth_pass``), Label
Studio sends them with every call and clicks are answered. Registered without them, or with a
wrong password, Label Studio refuses to connect and says why. The backend is not told where Label
Studio is (no LABEL_STUDIO_URL): it learns the address from Label Studio's authenticated /setup,
and only because that /setup was authenticated does its API key go there.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.support.ls_harness import LabelStudioAPIError
from tests.support.server_utils import REPO, free_port
from tests.e2e.test_backend_with_label_studio import check_answer, click, images, keypoint_region  # noqa: F401

USER = "label-studio"
PASSWORD = "e2e-" + os.urandom(9).hex()


@pytest.fixture(scope="module")
def auth_backend(session_backend_process, checkpoint_factory, label_studio, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "LABEL_STUDIO_API_KEY": label_studio.token,
           "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD, "LOG_LEVEL": "DEBUG",
           "SAM_BACKEND_IMAGE_CACHE_DIR": str(tmp_path_factory.mktemp("image-cache")),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    env.pop("LABEL_STUDIO_URL", None)
    env.pop("LABEL_STUDIO_HOST", None)
    return session_backend_process(
        ["label-studio-ml", "start", "sam", "--with", "model_name=mobile_sam",
         f"sam_checkpoint_file={checkpoint_factory('mobile_sam')}", "device=cpu",
         "runtime=torch", "-p", str(port), "--host", "127.0.0.1"], port, env=env, cwd=REPO,
        name="sam-backend-basic-auth")


@pytest.fixture(scope="module")
def project(label_studio, images):  # noqa: F811
    api = label_studio.api
    config = (REPO / "xml_templates" / "point_to_brush.xml").read_text()
    made = api.create_project("e2e basic auth", config)
    tasks = api.import_image(made["id"], images["png"])
    return {"project": made, "tasks": tasks, "config": config}


def test_backend_registered_with_basic_auth_answers_clicks(label_studio, auth_backend, project):
    ml = label_studio.api.add_ml_backend(
        project["project"]["id"], auth_backend.url, is_interactive=True,
        auth_method="BASIC_AUTH", basic_auth_user=USER, basic_auth_pass=PASSWORD)
    assert ml["auth_method"] == "BASIC_AUTH" and ml["basic_auth_pass_is_set"]
    made = {**project, "ml": ml}
    task = project["tasks"][0]
    data = click(label_studio, made, task, [keypoint_region(project["config"], 36.0, 50.0)])
    _, mask = check_answer(data, project["config"], {"brushlabels"})
    assert mask.any()
    log = auth_backend.log_path.read_text()
    # the image came from the address Label Studio sent in its (authenticated) /setup
    assert f"Label Studio URL from /setup: {label_studio.url}" in log
    image = task["data"]["image"]
    assert f"GET {label_studio.url}{image} (Label Studio credentials: legacy token)" in log
    assert "is not sent to" not in log  # the key was not withheld from the authenticated /setup
    assert PASSWORD not in log and label_studio.token not in log


@pytest.mark.parametrize("credentials", [{}, {"auth_method": "BASIC_AUTH",
                                              "basic_auth_user": USER,
                                              "basic_auth_pass": "not-the-password"}],
                         ids=["without credentials", "wrong password"])
def test_backend_registered_without_the_right_credentials_is_refused(label_studio, auth_backend,
                                                                     project, credentials):
    with pytest.raises(LabelStudioAPIError) as err:
        label_studio.api.add_ml_backend(project["project"]["id"], auth_backend.url,
                                        is_interactive=True, **credentials)
    shown = str(err.value)
    assert err.value.status == 400, shown
    if credentials:  # Label Studio's own message for a 401 from /health
        assert "authentication parameters were either not provided or are incorrect" in shown
    else:  # /health answers liveness, /setup says what to do
        assert "authentication required" in shown and "basic auth" in shown
    assert PASSWORD not in shown
