"""What a task's URL means: Label Studio URL forms, local files under the document root, keys."""
from __future__ import annotations

import base64
import os

import pytest

from sam_backend.common.text import redact_url
from sam_backend.errors import ImageError

from tests.support.loopback_hosts import LEGACY_TOKEN, SIGNATURE, assert_rotated_cat, rgb_png


def test_other_label_studio_url_forms(ls, storage, make_loader):
    ls.cloud["s3://bucket/cat.jpg"] = storage.presigned("/bucket/cat.jpg")
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    # What Label Studio calls itself (sent in /setup) differs from how the backend reaches it.
    loader.update_from_setup("http://localhost:8080", "ignored-because-env-has-a-key")
    loader.load("http://localhost:8080/data/upload/1/y.png")
    assert ls.requests[-1][1:] == ("/data/upload/1/y.png", f"Token {LEGACY_TOKEN}")
    # Old exports: "upload/..." means "/data/upload/...".
    loader.load("upload/1/y.png")
    assert ls.requests[-1][1] == "/data/upload/1/y.png"
    # A presign URL already resolved by Label Studio.
    fileuri = base64.urlsafe_b64encode(b"s3://bucket/cat.jpg").decode()
    assert_rotated_cat(loader.load(f"/tasks/5/presign/?fileuri={fileuri}"))
    assert "authorization" not in storage.headers[-1]


def test_local_files_read_from_document_root(ls, make_loader, doc_root):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN,
                         local_files_document_root=str(doc_root))
    assert loader.load("/data/local-files/?d=sub/img.png")[0, 0].tolist() == [5, 6, 7]
    assert loader.load("/data/local-files/?d=/sub/img.png")[0, 0].tolist() == [5, 6, 7]
    assert loader.load(ls.url + "/data/local-files/?d=sub%2Fimg.png")[0, 0].tolist() == [5, 6, 7]
    assert ls.requests == []  # nothing downloaded


@pytest.mark.parametrize("d", ["../secret.png", "sub/../../secret.png", "sub/../../root/../secret.png"])
def test_local_files_refuse_escaping_paths(make_loader, doc_root, d):
    loader = make_loader(local_files_document_root=str(doc_root))
    with pytest.raises(ImageError, match="escapes LOCAL_FILES_DOCUMENT_ROOT"):
        loader.load(f"/data/local-files/?d={d}")
    with pytest.raises(ImageError, match="escapes"):
        loader.source_key(f"/data/local-files/?d={d}")


def test_local_files_without_document_root_download_from_ls(ls, make_loader, doc_root):
    ls.local_root = str(doc_root)
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    assert loader.load("/data/local-files/?d=sub/img.png")[0, 0].tolist() == [5, 6, 7]
    assert ls.count("/data/local-files/") == 1
    ls.local_root = None
    with pytest.raises(ImageError, match="LOCAL_FILES_SERVING_ENABLED") as err:
        loader.load("/data/local-files/?d=sub/img.png")
    assert "LOCAL_FILES_DOCUMENT_ROOT" in str(err.value)
    loader = make_loader(local_files_document_root=str(doc_root))
    with pytest.raises(ImageError, match="not found under LOCAL_FILES_DOCUMENT_ROOT"):
        loader.load("/data/local-files/?d=sub/nothing.png")


def test_plain_paths_and_file_urls_only_inside_the_document_root(make_loader, doc_root):
    path = doc_root / "sub" / "img.png"
    secret = doc_root.parent / "secret.png"
    off = make_loader()  # no document root: local files are off
    for url in (str(path), path.as_uri(), "sub/img.png"):
        with pytest.raises(ImageError, match="is not available"):
            off.load(url)
    loader = make_loader(local_files_document_root=str(doc_root))
    assert loader.load(str(path))[0, 0].tolist() == [5, 6, 7]
    assert loader.load(path.as_uri())[0, 0].tolist() == [5, 6, 7]
    assert loader.load("sub/img.png")[0, 0].tolist() == [5, 6, 7]  # relative to the root
    # outside the root, missing, a directory, a device, a FIFO, a NUL: one message for all
    fifo = doc_root / "sub" / "fifo.png"
    os.mkfifo(fifo)
    (doc_root / "sub" / "dev.png").symlink_to("/dev/zero")
    messages = set()
    for url in (str(secret), secret.as_uri(), "../secret.png", str(doc_root / "nope.png"),
                str(doc_root / "sub"), "/dev/zero", str(fifo), "sub/dev.png", "sub/img\x00.png",
                "/etc/passwd"):
        with pytest.raises(ImageError, match="is not available") as err:
            loader.load(url)
        messages.add(str(err.value).replace(url, "<url>").replace(redact_url(url), "<url>"))
    assert len(messages) == 1, messages
    assert "bytes" not in messages.pop()


def test_local_files_are_read_with_the_download_limit(make_loader, doc_root):
    big = doc_root / "sub" / "big.png"
    big.write_bytes(rgb_png() + b"\0" * 5000)
    loader = make_loader(local_files_document_root=str(doc_root), max_download_bytes=4000)
    with pytest.raises(ImageError, match="larger than 4,000 bytes"):
        loader.load(str(big))
    with pytest.raises(ImageError, match="larger than 4,000 bytes"):
        loader.load("/data/local-files/?d=sub/big.png")


def test_source_key(ls, make_loader, doc_root):
    loader = make_loader(label_studio_url=ls.url, local_files_document_root=str(doc_root))
    path = doc_root / "sub" / "img.png"
    key1 = loader.source_key(str(path))
    assert key1 == loader.source_key(path.as_uri()) == loader.source_key("/data/local-files/?d=sub/img.png")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert loader.source_key(str(path)) != key1  # changed file, new identity
    assert loader.source_key("/data/upload/1/x.jpg") == ls.url + "/data/upload/1/x.jpg"
    assert loader.source_key("s3://bucket/cat.jpg", task_id=1) == "s3://bucket/cat.jpg"
    signed = f"https://example.com/a.jpg?X-Amz-Signature={SIGNATURE}"
    key = loader.source_key(signed)
    assert SIGNATURE not in key and key != loader.source_key(signed + "x")
    assert ls.requests == []



@pytest.fixture
def linked_root(doc_root, tmp_path):
    """``doc_root`` with symbolic links: out of the root (to a directory with a real PNG and a
    text file, to that PNG, to /etc, through a link to the root itself) and inside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(rgb_png(colour=(66, 66, 66)))
    (outside / "notes.txt").write_bytes(b"x" * 671)
    (doc_root / "outlink").symlink_to(outside)
    (doc_root / "filelink.png").symlink_to(outside / "secret.png")
    (doc_root / "etclink").symlink_to("/etc")
    (doc_root / "inlink").symlink_to(doc_root / "sub")  # stays inside
    (doc_root / "sub" / "rel.png").symlink_to("img.png")  # relative, stays inside
    (doc_root / "sub" / "up").symlink_to("..")  # the root itself
    return doc_root


def test_symlinks_out_of_the_document_root_are_refused_with_the_one_message(make_loader,
                                                                            linked_root):
    root = linked_root
    loader = make_loader(local_files_document_root=str(root))
    refused = ["outlink/secret.png", "outlink/notes.txt", "outlink/missing.png", "filelink.png",
               "etclink/shadow", "etclink/passwd", "etclink/no-such-file", "etclink",
               str(root / "outlink" / "secret.png"), (root / "filelink.png").as_uri(),
               "sub/up/outlink/secret.png", "nope.png", "../secret.png"]
    messages = set()
    for url in refused:
        for attempt in (loader.load, loader.source_key):  # the key is not computed either
            with pytest.raises(ImageError, match="is not available") as err:
                attempt(url)
            messages.add(str(err.value).replace(url, "<url>").replace(redact_url(url), "<url>"))
    assert len(messages) == 1, messages
    assert "bytes" not in messages.pop()
    # /data/local-files/?d=...: a link out of the root is not there, like a missing file
    for d in ("outlink/secret.png", "etclink/passwd", "filelink.png", "sub/up/etclink/passwd"):
        with pytest.raises(ImageError, match="not found under LOCAL_FILES_DOCUMENT_ROOT"):
            loader.load(f"/data/local-files/?d={d}")
    # links that stay inside the root keep working, in every form
    for url in ("inlink/img.png", "sub/rel.png", "sub/up/sub/img.png", str(root / "inlink/img.png"),
                "/data/local-files/?d=inlink/img.png", "/data/local-files/?d=sub/rel.png"):
        assert loader.load(url)[0, 0].tolist() == [5, 6, 7], url


def test_a_file_swapped_for_a_link_after_the_check_is_not_read(make_loader, doc_root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "img.png").write_bytes(rgb_png(colour=(66, 66, 66)))
    image = doc_root / "sub" / "img.png"
    loader = make_loader(local_files_document_root=str(doc_root))
    ref = loader.locate("sub/img.png")  # resolved and keyed: inside the root
    image.unlink()
    image.symlink_to(outside / "img.png")  # the file becomes a link out of the root
    with pytest.raises(ImageError, match="is not available"):
        ref.load()
    image.unlink()
    image.write_bytes(rgb_png(colour=(5, 6, 7)))
    ref = loader.locate("/data/local-files/?d=sub/img.png")
    (doc_root / "sub").rename(doc_root / "old")
    (doc_root / "sub").symlink_to(outside)  # a directory on the way becomes a link out of it
    with pytest.raises(ImageError, match="is not available"):
        ref.load()
