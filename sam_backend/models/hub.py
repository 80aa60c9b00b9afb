"""Checkpoints that are model-hub repositories (SAM 3: ``facebook/sam3``), fetched with
``huggingface_hub``.

A variant whose ``url`` is a hub repository page (``https://huggingface.co/<owner>/<name>``, no
file part) has a hub-format **directory** as its checkpoint: ``<weights dir>/<checkpoint_name>/``
holding ``config.json`` and ``*.safetensors``. The download:

- uses the user's hub token (``HF_TOKEN``, or the token ``hf auth login`` stored) and a hub
  mirror when ``HF_ENDPOINT`` is set (``huggingface_hub`` reads both);
- fetches only what loading needs (JSON configs, tokenizer files, safetensors: not the repository's
  copy of the original training checkpoint);
- shows huggingface_hub's progress bars;
- goes into a temporary directory beside the destination and is moved into place only after the
  weights load strictly into the architecture. Whatever goes wrong — access refused (a gated
  repository), unreachable hub, a check failing — the temporary directory is removed: nothing is
  left behind.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Union
from urllib.parse import urlsplit

from sam_backend.common.files import atomic_path
from sam_backend.errors import CheckpointError
from sam_backend.models.registry import Variant

log = logging.getLogger(__name__)

HUB_HOSTS = ("huggingface.co", "hf.co")
TOKEN_ENV = "HF_TOKEN"
ENDPOINT_ENV = "HF_ENDPOINT"
# What loading reads; a hub repository may hold more (facebook/sam3 also has the original
# training checkpoint, as large as the safetensors).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt"]


def hub_repo(variant: Variant) -> Optional[str]:
    """``owner/name`` when ``variant``'s checkpoint is a hub repository, else None."""
    parts = urlsplit(variant.url)
    segments = [s for s in parts.path.split("/") if s]
    if parts.hostname in HUB_HOSTS and len(segments) == 2:
        return "/".join(segments)
    return None


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def endpoint() -> str:
    return (os.environ.get(ENDPOINT_ENV) or "https://huggingface.co").rstrip("/")


def page_url(variant: Variant) -> str:
    return f"https://huggingface.co/{hub_repo(variant)}"


def access_message(variant: Variant, reason: str) -> str:
    repo = hub_repo(variant)
    token = "HF_TOKEN is set but that token was refused" if os.environ.get(TOKEN_ENV) \
        else "HF_TOKEN is not set"
    return (f"access to {repo} was refused ({reason}; {token}). The {variant.key} checkpoint is "
            f"gated: 1) sign in at https://huggingface.co and request access on "
            f"{page_url(variant)} (approval can take a while); 2) create a read token at "
            f"https://huggingface.co/settings/tokens; 3) export HF_TOKEN=<token> and run "
            f"`sam-backend weights download {variant.model_name}` again. Nothing was downloaded")


def _refusal(exc: BaseException) -> Optional[str]:
    """'HTTP 401/403 ...' when ``exc`` (or what it was raised from) is the hub refusing access."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, GatedRepoError):
            return "the repository is gated"
        if isinstance(exc, HfHubHTTPError):
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                return f"HTTP {status}"
            if isinstance(exc, RepositoryNotFoundError):
                return "the hub says the repository does not exist or needs a token"
        exc = exc.__cause__ or exc.__context__
    return None


def download(variant: Variant, dest_dir: Union[str, Path], force: bool = False,
             progress: bool = True) -> Path:
    """Fetch ``variant``'s hub repository into ``dest_dir/<checkpoint_name>/``, verified."""
    return download_repo(hub_repo(variant), Path(dest_dir).expanduser() / variant.checkpoint_name,
                         lambda directory: verify(variant, directory), what=variant.key,
                         refused=lambda reason: access_message(variant, reason), force=force,
                         progress=progress)


def download_repo(repo: str, dest: Path, check: Callable[[Path], None], *, what: str,
                  refused: Optional[Callable[[str], str]] = None, force: bool = False,
                  progress: bool = True) -> Path:
    """Fetch the hub repository ``repo`` (``owner/name``) into the directory ``dest`` as the
    module docstring says (token, mirror, progress, only what loading reads, nothing left behind
    on failure). ``check(directory)`` verifies the download before it is moved into place (it
    raises CheckpointError when the files do not load); ``what`` names the model in messages;
    ``refused(reason)`` is the message when the hub refuses access (default: a generic one). An
    existing ``dest`` with a ``config.json`` is kept unless ``force``."""
    from huggingface_hub import snapshot_download

    dest = Path(dest).expanduser()
    if is_checkpoint_dir(dest) and not force:
        log.info("%s is already present at %s (force to download again)", what, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:  # removed on any failure: nothing is left behind
        tmp.mkdir()
        log.info("downloading %s from %s/%s", what, endpoint(), repo)
        from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                           enable_progress_bars)

        quiet = not progress and not are_progress_bars_disabled()
        if quiet:
            disable_progress_bars()
        try:
            snapshot_download(
                repo, local_dir=str(tmp), cache_dir=str(tmp / ".hub-cache"),
                allow_patterns=ALLOW_PATTERNS, endpoint=os.environ.get(ENDPOINT_ENV) or None)
        except Exception as exc:  # huggingface_hub raises many kinds; sort them for the user
            reason = _refusal(exc)
            if reason:
                raise CheckpointError(
                    refused(reason) if refused else
                    f"access to {repo} was refused ({reason}). Nothing was downloaded") from None
            raise CheckpointError(
                f"cannot download {what} from {endpoint()}/{repo}: {type(exc).__name__}: "
                f"{exc}. Nothing was kept. Offline, copy a hub-format directory of {repo} "
                f"(config.json + model.safetensors) to {dest}; or set {ENDPOINT_ENV} to a hub "
                f"mirror") from None
        finally:
            if quiet:
                enable_progress_bars()
        for leftover in (tmp / ".hub-cache", tmp / ".cache"):
            shutil.rmtree(leftover, ignore_errors=True)
        check(tmp)
        if dest.exists():  # force: the old directory goes only once the new one is verified
            shutil.rmtree(dest)
    log.info("%s: verified and saved to %s", what, dest)
    return dest


def verify(variant: Variant, directory: Path) -> None:
    """The directory's click model loads strictly into its architecture (else CheckpointError)."""
    import gc

    from sam_backend.models.sam3_runtime import load_click_model

    try:
        model = load_click_model(variant, directory, "cpu")
    except CheckpointError as exc:
        raise CheckpointError(f"the download of {variant.key} failed its check (loads into "
                              f"{variant.key}): {exc}. The download was removed") from None
    del model
    gc.collect()


def missing_message(variant: Variant, path: Path) -> str:
    return (f"checkpoint directory {path} for {variant.key} is missing and downloads are off "
            f"(offline). Get it with `sam-backend weights download {variant.model_name}` on a "
            f"machine with access to {page_url(variant)} (gated: HF_TOKEN), then copy the "
            f"directory (config.json + model.safetensors) to {path}")
