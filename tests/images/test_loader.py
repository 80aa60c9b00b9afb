"""The loader as a whole: one click on a new image downloads it once and reads its header once,
through the real /predict service (a random-weight MobileSAM) and a loopback fake Label Studio.
Header reads are counted at Pillow's ``Image.open`` (which still runs), the only way our code
reads a header."""
from __future__ import annotations

import pytest
from PIL import Image

from sam_backend.images.config import ImageAccessSettings
from sam_backend.images.loader import ImageLoader
from sam_backend.assembly import prediction_service
from sam_backend.settings import Settings

from tests.support.loopback_hosts import LEGACY_TOKEN, encode
from tests.support.payloads import FULL_CONFIG, H, W, keypoint
from tests.support.random_weights import synthetic_image


@pytest.fixture
def header_reads(monkeypatch):
    """How many times Pillow opened an image (read a header) during the test."""
    calls = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        calls.append(1)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return calls


def test_a_load_downloads_once_and_reads_the_header_once(ls, make_loader, header_reads):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN, cache_max_bytes=10**7)
    image = loader.locate("/data/upload/1/y.png")
    assert image.key == ls.url + "/data/upload/1/y.png" and ls.requests == []  # no download yet
    assert image.load().shape == (6, 8, 3)
    assert ls.count("/data/upload/1/y.png") == 1 and len(header_reads) == 1
    assert loader.load("/data/upload/1/y.png").shape == (6, 8, 3)  # from the disk cache
    assert ls.count("/data/upload/1/y.png") == 1 and len(header_reads) == 2


def test_a_click_touches_the_image_once(ls, checkpoint_factory, tmp_path, header_reads):
    ls.files["/data/upload/1/scene.png"] = (encode(Image.fromarray(synthetic_image(H, W, seed=3)),
                                                   "PNG"), "image/png")
    settings = Settings.load({"model_name": "mobile_sam", "device": "cpu", "runtime": "torch",
                              "sam_checkpoint_file": str(checkpoint_factory("mobile_sam")),
                              "embedding_dtype": "float32"}, environ={})
    images = ImageLoader(ImageAccessSettings(label_studio_url=ls.url, api_key=LEGACY_TOKEN,
                                             cache_dir=str(tmp_path / "cache")))
    service = prediction_service(settings, images=images)
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/scene.png"}}]
    try:
        before = len(header_reads)
        first = service.predict(tasks, FULL_CONFIG, {"result": [keypoint(40, 50)]})
        assert ls.count("/data/upload/1/scene.png") == 1  # one GET, no second resolution's fetch
        assert len(header_reads) - before == 1  # the header is read once
        assert any(r["type"] == "brushlabels" for r in first[0]["result"])
        # the next click on the same image: embedded, so neither downloaded nor opened again
        service.predict(tasks, FULL_CONFIG, {"result": [keypoint(60, 30)]})
        assert ls.count("/data/upload/1/scene.png") == 1 and len(header_reads) - before == 1
    finally:
        images.close()


def test_only_downloads_take_a_download_slot(ls, make_loader, doc_root):
    from sam_backend.errors import BusyError

    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN, cache_max_bytes=10**7,
                         local_files_document_root=str(doc_root), max_concurrent_downloads=1)
    cached = loader.locate("/data/upload/1/y.png")
    assert cached.load().shape == (6, 8, 3)  # downloaded once, now in the disk cache
    with loader.downloads.admit():  # the one download slot is taken
        with pytest.raises(BusyError, match="max_concurrent_downloads=1"):
            loader.locate("/data/upload/1/x.jpg").fetch()
        # a local file and a disk-cache hit need no slot; fetch and decode are two steps
        local = loader.locate("sub/img.png")
        assert local.decode(local.fetch()).shape == (6, 8, 3)
        assert cached.decode(cached.fetch()).shape == (6, 8, 3)
    assert ls.count("/data/upload/1/y.png") == 1 and loader.downloads.held == 0
