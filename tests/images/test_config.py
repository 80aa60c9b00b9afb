"""Image access settings: built from the backend's Settings (options over environment)."""
from __future__ import annotations

import pytest

from sam_backend.errors import SamBackendError
from sam_backend.images.config import ImageAccessSettings
from sam_backend.settings import Settings

from tests.support.loopback_hosts import LEGACY_TOKEN


def test_settings_from_the_environment_names_the_image_layer_always_took(tmp_path):
    environ = {"LABEL_STUDIO_URL": "http://ls:8080/", "LABEL_STUDIO_API_KEY": LEGACY_TOKEN,
               "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
               "SAM_BACKEND_IMAGE_CACHE_DIR": str(tmp_path / "c"),
               "SAM_BACKEND_IMAGE_CACHE_BYTES": "1000", "SAM_BACKEND_MAX_IMAGE_PIXELS": "2e6",
               "SAM_BACKEND_MAX_IMAGE_BYTES": "5000"}
    s = ImageAccessSettings.from_settings(Settings.load({}, environ=environ), timeout=3.0,
                                          label_studio_url=None)
    assert s.label_studio_url == "http://ls:8080/" and s.api_key == LEGACY_TOKEN
    assert s.cache_max_bytes == 1000 and s.max_pixels == 2_000_000 and s.timeout == 3.0
    assert s.max_download_bytes == 5000
    assert s.cache_dir == str(tmp_path / "c") and s.local_files_document_root == str(tmp_path)
    assert LEGACY_TOKEN not in repr(s)
    with pytest.raises(TypeError, match="unknown image access setting"):
        ImageAccessSettings.from_settings(Settings.load({}, environ={}), max_pixel=3)


@pytest.mark.parametrize("environ, message", [
    ({"SAM_BACKEND_MAX_IMAGE_PIXELS": "lots"},
     "SAM_BACKEND_MAX_IMAGE_PIXELS='lots' is not a valid int"),
    ({"SAM_BACKEND_MAX_IMAGE_PIXELS": "2.5"},  # not a whole number
     "SAM_BACKEND_MAX_IMAGE_PIXELS='2.5' is not a valid int"),
    ({"SAM_BACKEND_IMAGE_TIMEOUT": "soon"},
     "SAM_BACKEND_IMAGE_TIMEOUT='soon' is not a valid float"),
    ({"SAM_BACKEND_IMAGE_TIMEOUT": "0"}, "image_timeout=0.0 must be a positive number"),
    ({"SAM_BACKEND_MAX_IMAGE_BYTES": "-1"}, "max_image_bytes=-1 must be a positive number"),
])
def test_a_bad_image_setting_names_its_variable(environ, message):
    with pytest.raises(SamBackendError) as err:
        Settings.load({}, environ=environ)
    assert message in str(err.value)
