"""The HTTP side: the routes Label Studio calls, and the ``sam-backend serve`` command.

Routes (what Label Studio 1.23 calls, and how long it waits):
- ``GET /health`` and ``GET /`` (1 s): answers once the model is loaded; names variant, runtime
  and device.
- ``POST /setup`` (3 s): remembers the project's label config and Label Studio's address and
  token; loads nothing.
- ``POST /predict``: one smart-tool click (or a task opened: no context -> empty answer, and the
  image starts encoding in the background). Needs no prior /setup: the request carries its
  ``label_config``.
- ``GET|POST /versions``, ``POST /webhook`` (acknowledged; this backend does not train),
  ``GET /metrics``.

Errors are JSON ``{"status": "error", "errors": [message]}``: 400 for a request that cannot be
answered as sent, 500 (with a generic message; the trace goes to the log) for a bug. The server
keeps serving either way.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional

import ujson
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from .backend import SamBackend
from .errors import RequestError, SamBackendError
from .service import SegmentationService
from .settings import Settings

log = logging.getLogger(__name__)


def _reason_phrase(message: str) -> str:
    """``message`` fit for an HTTP status line: Latin-1, one line, bounded."""
    text = " ".join(message.split())
    text = text.encode("latin-1", "replace").decode("latin-1")
    return text[:400]


def _error(message: str, status: int):
    """A JSON error whose message is also the HTTP reason phrase.

    Label Studio's ML connector reports a failed /predict as ``str(HTTPError)``, i.e.
    ``"400 Client Error: <reason phrase> for url: ..."``, and drops the body: putting the message
    in the reason phrase is how it reaches the annotator's screen.
    """
    response = jsonify({"status": "error", "errors": [message]})
    response.status = f"{status} {_reason_phrase(message)}"
    return response


def _json_response(body: Any) -> Response:
    """JSON for the hot path. A brush mask is a list of up to millions of small ints; ujson
    encodes it about 5x faster than the standard library (4 ms vs 21 ms for a 290 000-value RLE
    measured here), which is a large part of a click's time."""
    try:
        text = ujson.dumps(body, ensure_ascii=False, escape_forward_slashes=False)
    except (OverflowError, TypeError, ValueError):  # NaN/inf or an unexpected type
        return jsonify(body)
    return Response(text, mimetype="application/json")


def _json_body() -> Dict[str, Any]:
    raw = request.get_data(cache=True)
    if not raw:
        raise RequestError("the request body is empty: send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def create_app(service: SegmentationService) -> Flask:
    """The Flask app around a ready service (its model is already loaded)."""
    app = Flask("sam_backend")
    app.config["JSON_SORT_KEYS"] = False
    model = service.segmenter.model

    @app.errorhandler(SamBackendError)
    def user_error(exc):
        log.warning("%s %s: %s", request.method, request.path, exc)
        return _error(str(exc), 400)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        return _error(f"{exc.code} {exc.name}: {exc.description}", exc.code or 500)

    @app.errorhandler(Exception)
    def internal_error(exc):
        log.exception("%s %s failed", request.method, request.path)
        return _error(f"internal error ({type(exc).__name__}); see the backend's log", 500)

    @app.route("/", methods=["GET"])
    @app.route("/health", methods=["GET"])
    def health():
        return jsonify({
            "status": "UP",
            "model_class": SamBackend.__name__,
            "model": model.variant.key,
            "runtime": model.runtime,
            "device": model.device,
            "model_version": service.model_version,
            "concept_model": service.settings.concept_model,
            "embedding_cache": {"images": len(service.segmenter.cache),
                                "bytes": service.segmenter.cache.nbytes,
                                "max_bytes": service.segmenter.cache.max_bytes},
        })

    @app.route("/setup", methods=["POST"])
    def setup():
        body = _json_body()
        service.setup(body.get("project"), body.get("schema"), body.get("hostname"),
                      body.get("access_token"))
        return jsonify({"model_version": service.model_version})

    @app.route("/predict", methods=["POST"])
    def predict():
        started = time.perf_counter()
        body = _json_body()
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise RequestError("params must be an object")
        context = params.get("context", body.get("context"))
        backend = SamBackend(label_config=body.get("label_config"), service=service,
                             project=body.get("project"))
        results = backend.predict(body.get("tasks"), context=context)
        log.info("predict: %d result(s) in %.0f ms", len(results),
                 (time.perf_counter() - started) * 1000)
        return _json_response({"results": results, "model_version": service.model_version})

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        return jsonify({"versions": [service.model_version], "model_version": service.model_version})

    @app.route("/webhook", methods=["POST"])
    def webhook():
        body = request.get_json(force=True, silent=True) or {}
        action = body.get("action") if isinstance(body, dict) else None
        log.debug("webhook %s acknowledged (this backend does not train)", action)
        return jsonify({"status": "ok", "action": action, "trained": False})

    @app.route("/metrics", methods=["GET"])
    def metrics():
        cache = service.segmenter.cache
        return jsonify({"embedding_cache_hits": cache.hits, "embedding_cache_misses": cache.misses,
                        "embedding_cache_images": len(cache), "embedding_cache_bytes": cache.nbytes})

    return app


def build_app(settings: Settings) -> Flask:
    """Load the model (and download its checkpoint if allowed), then return the app."""
    app = create_app(SegmentationService.from_settings(settings))
    # After loading, the process tracks a few hundred thousand long-lived objects (torch, timm,
    # segment_anything); a full collection over them takes ~200 ms and lands in the middle of a
    # click. Freezing moves them out of the collector's generations for good.
    gc.collect()
    gc.freeze()
    return app


# -- the command line -----------------------------------------------------------------------------

def parse_with(pairs: Optional[List[str]]) -> Dict[str, str]:
    """``["k=v", ...]`` -> dict; values stay strings and Settings types them."""
    options: Dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SamBackendError(f"--with expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key.strip()] = value
    return options


def serve(args) -> int:
    """Run the app on gunicorn: one process (the model is loaded once), many threads."""
    from gunicorn.app.base import BaseApplication

    options = parse_with(args.kwargs)
    for name in Settings.option_names():
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    settings = Settings.load(options)

    class Server(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", 1)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", args.threads)
            self.cfg.set("timeout", 300)  # a first vit_h encode on CPU takes a while
            self.cfg.set("accesslog", "-" if args.access_log else None)
            self.cfg.set("loglevel", args.log_level.lower())

        def load(self):
            # Loaded in the worker, after the fork: torch's thread pools do not survive a fork.
            return build_app(settings)

    Server().run()
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the backend on a production WSGI server (gunicorn, threaded)")
    parser.add_argument("-p", "--port", type=int, default=int(os.environ.get("PORT", 9090)))
    parser.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    parser.add_argument("--threads", type=int, default=8, help="request threads (default 8)")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--with", "--kwargs", dest="kwargs", nargs="+", metavar="KEY=VALUE",
                        help="options as label-studio-ml's --with takes them")
    for name in Settings.option_names():
        field = Settings.__dataclass_fields__[name]
        parser.add_argument(f"--{name}", default=None, help=field.metadata.get("help"))
    parser.set_defaults(func=serve)
