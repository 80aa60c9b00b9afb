"""Image access settings from options and the environment."""
from __future__ import annotations

import pytest

from sam_backend.errors import SamBackendError
from sam_backend.images.config import ImageAccessSettings

from loopback_hosts import LEGACY_TOKEN


def test_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls:8080/")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY_TOKEN)
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    monkeypatch.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("SAM_BACKEND_IMAGE_CACHE_BYTES", "1000")
    monkeypatch.setenv("SAM_BACKEND_MAX_IMAGE_PIXELS", "2e6")
    s = ImageAccessSettings.from_env(timeout=3.0, label_studio_url=None)
    assert s.label_studio_url == "http://ls:8080/" and s.api_key == LEGACY_TOKEN
    assert s.cache_max_bytes == 1000 and s.max_pixels == 2_000_000 and s.timeout == 3.0
    assert s.cache_dir == str(tmp_path / "c") and s.local_files_document_root == str(tmp_path)
    assert LEGACY_TOKEN not in repr(s)
    monkeypatch.setenv("SAM_BACKEND_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(SamBackendError, match="SAM_BACKEND_MAX_IMAGE_PIXELS"):
        ImageAccessSettings.from_env()
    monkeypatch.setenv("SAM_BACKEND_MAX_IMAGE_PIXELS", "2.5")  # not a whole number
    with pytest.raises(SamBackendError, match="must be an integer, got '2.5'"):
        ImageAccessSettings.from_env()
    monkeypatch.setenv("SAM_BACKEND_MAX_IMAGE_PIXELS", "100")
    monkeypatch.setenv("SAM_BACKEND_IMAGE_TIMEOUT", "soon")
    with pytest.raises(SamBackendError, match="SAM_BACKEND_IMAGE_TIMEOUT must be a number of "
                                              "seconds, got 'soon'"):
        ImageAccessSettings.from_env()
