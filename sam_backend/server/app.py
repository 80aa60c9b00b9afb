"""The HTTP layer: the routes Label Studio calls, and the ``sam-backend serve`` command.

Thin: each route parses the request, calls the :class:`PredictionService` (the Label Studio
layer) and formats its answer. ``label-studio-ml start sam`` (``sam/_wsgi.py``) and
``sam-backend serve`` both serve :func:`build_app`.

Routes (what Label Studio 1.23 calls, and how long it waits):
- ``GET /health`` and ``GET /`` (1 s): answers once the model is loaded; names variant, runtime
  and device.
- ``POST /setup`` (3 s): remembers the project's label config and Label Studio's address and
  token; loads nothing.
- ``POST /predict``: one smart-tool click (or a task opened: no context -> empty answer, and the
  image starts encoding in the background). Needs no prior /setup: the request carries its
  ``label_config``.
- ``GET|POST /versions``, ``POST /webhook`` (acknowledged; this backend does not train),
  ``GET /metrics`` (memory hits/misses, encoder runs, and with a shared store its hits, misses,
  writes, corrupt entries, lock waits and the precompute queue's length).

Errors are JSON ``{"status": "error", "errors": [message]}``: 400 for a request that cannot be
answered as sent, 500 (with a generic message; the trace goes to the log) for a bug. The server
keeps serving either way.
"""
from __future__ import annotations

import gc
import json
import logging
import time
from typing import Any, Dict, List

import ujson
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, RequestTimeout

from sam_backend.common.deadline import ClientGone, WorkScope
from sam_backend.common.limits import MIB, printable, release_memory_if_due
from sam_backend.errors import BusyError, RequestError, SamBackendError
from sam_backend.labelstudio.service import PredictionService
from sam_backend.server import auth as basic_auth
from sam_backend.settings import Settings, add_listen_arguments, add_option_arguments, \
    settings_from_args

log = logging.getLogger(__name__)

# /health's ``model_class``: label-studio-ml backends name their model class there; this backend
# has always answered "SamBackend" (Label Studio does not read it; monitoring may).
MODEL_CLASS = "SamBackend"


def _reason_phrase(message: str) -> str:
    """``message`` fit for an HTTP status line: printable Latin-1, one line, bounded."""
    return printable(message, 300).encode("latin-1", "replace").decode("latin-1")


def _error(message: str, status: int):
    """A JSON error whose message is also the HTTP reason phrase.

    Label Studio's ML connector reports a failed /predict as ``str(HTTPError)``, i.e.
    ``"400 Client Error: <reason phrase> for url: ..."``, and drops the body: putting the message
    in the reason phrase is how it reaches the annotator's screen.
    """
    response = jsonify({"status": "error", "errors": [printable(message, 2000)]})
    response.status = f"{status} {_reason_phrase(message)}"
    return response


def _json_response(body: Any) -> Response:
    """JSON for the hot path. A brush mask is a list of up to millions of small ints; ujson
    encodes it several times faster than the standard library (README "Speed" has the figures),
    and that is a large part of a click's time."""
    try:
        text = ujson.dumps(body, ensure_ascii=False, escape_forward_slashes=False)
    except (OverflowError, TypeError, ValueError):  # NaN/inf or an unexpected type
        return jsonify(body)
    return Response(text, mimetype="application/json")


def _read_body(limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (413 past it, with or without Content-Length;
    408 when the client stops sending: the server's request read timeout)."""
    too_large = (f"the request body is larger than {limit / MIB:g} MiB (max_request_mb)")
    if request.content_length is not None and request.content_length > limit:
        raise RequestEntityTooLarge(too_large)
    chunks: List[bytes] = []
    total = 0
    try:
        while True:
            chunk = request.stream.read(min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                chunks.clear()
                raise RequestEntityTooLarge(too_large)
    except OSError:
        chunks.clear()
        raise RequestTimeout("the request body was not received in time (request_timeout)") \
            from None
    return b"".join(chunks)


def _json_body(limit: int) -> Dict[str, Any]:
    raw = _read_body(limit)
    if not raw:
        raise RequestError("the request body is empty: send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise RequestError("the request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _optional(body: Dict[str, Any], name: str, types, what: str):
    """``body[name]`` if it is None or of ``types``, else a 400 naming the field."""
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
        raise RequestError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def create_app(service: PredictionService) -> Flask:
    """The Flask app around a ready service (its model is already loaded)."""
    app = Flask("sam_backend")
    # Keep the order the routes build. Flask >= 2.2 reads app.json (constraints.txt pins 3.x);
    # the config key is what a venv still on label-studio-ml's Flask 1.1.2 reads.
    if hasattr(app, "json"):
        app.json.sort_keys = False
    else:
        app.config["JSON_SORT_KEYS"] = False
    body_limit = int(service.settings.max_request_mb * MIB)
    app.config["MAX_CONTENT_LENGTH"] = body_limit
    model = service.segmenter.model
    auth = basic_auth.BasicAuth(service.settings.basic_auth_user, service.settings.basic_auth_pass)
    basic_auth.install(app, auth, _error)

    @app.teardown_request
    def after_request_memory(_exc):
        release_memory_if_due()  # a large image or mask was handled: give its heap back

    @app.errorhandler(BusyError)
    def busy(exc):
        log.warning("%s %s: %s", request.method, request.path, exc)
        response = _error(str(exc), 503)
        response.headers["Retry-After"] = "2"
        return response

    @app.errorhandler(ClientGone)
    def client_gone(exc):
        # nobody reads the answer: one line in the log, no trace (499: nginx's "client closed")
        log.info("%s %s: %s", request.method, request.path, exc)
        return _error(str(exc), 499)

    @app.errorhandler(SamBackendError)
    def user_error(exc):
        log.warning("%s %s: %s", request.method, request.path, printable(str(exc), 2000))
        return _error(str(exc), 400)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        response = _error(f"{exc.code} {exc.name}: {exc.description}", exc.code or 500)
        if exc.code in (408, 413):  # the rest of the body is not wanted: do not wait for it
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(Exception)
    def internal_error(exc):
        log.exception("%s %s failed", request.method, request.path)
        return _error(f"internal error ({type(exc).__name__}); see the backend's log", 500)

    @app.route("/", methods=["GET"])
    @app.route("/health", methods=["GET"])
    def health():
        if not g.authenticated:  # basic auth on, none given: liveness only
            return jsonify({"status": "UP"})
        return jsonify({
            "status": "UP",
            "model_class": MODEL_CLASS,
            "model": model.variant.key,
            "runtime": model.runtime,
            "device": model.device,
            "model_version": service.model_version,
            "concept_model": service.settings.concept_model,
            "embedding_cache": {"images": len(service.segmenter.cache),
                                "bytes": service.segmenter.cache.nbytes,
                                "max_bytes": service.segmenter.cache.max_bytes},
            "embedding_store": service.store_status(),
        })

    @app.route("/setup", methods=["POST"])
    def setup():
        body = _json_body(body_limit)
        service.setup(_optional(body, "project", (str, int), "a string or an integer"),
                      _optional(body, "schema", str, "the labeling config XML (a string)"),
                      _optional(body, "hostname", str, "a URL string"),
                      _optional(body, "access_token", str, "a string"),
                      authenticated=auth.enabled and g.authenticated)
        return jsonify({"model_version": service.model_version})

    @app.route("/predict", methods=["POST"])
    def predict():
        started = time.perf_counter()
        body = _json_body(body_limit)
        params = _optional(body, "params", dict, "an object") or {}
        context = params.get("context", body.get("context"))
        # the results and their JSON stay counted in image_memory_mb until the answer is sent
        held = service.memory.hold(service.settings.memory_wait)
        try:
            results = service.predict(
                body.get("tasks"),
                _optional(body, "label_config", str, "the labeling config XML (a string)"),
                context, _optional(body, "project", (str, int), "a string or an integer"),
                scope=WorkScope(service.settings.predict_timeout,
                                request.environ.get("waitress.client_disconnected"),
                                "predict_timeout"),
                held=held)
            log.info("predict: %d result(s) in %.0f ms", len(results),
                     (time.perf_counter() - started) * 1000)
            response = _json_response({"results": results, "model_version": service.model_version})
        except BaseException:
            held.release()
            raise
        response.call_on_close(held.release)
        return response

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        return jsonify({"versions": [service.model_version], "model_version": service.model_version})

    @app.route("/webhook", methods=["POST"])
    def webhook():
        try:
            body = _json_body(body_limit)
        except RequestError:
            body = {}
        action = body.get("action")
        action = printable(action, 100) if isinstance(action, str) else None
        log.debug("webhook %s acknowledged (this backend does not train)", action)
        return jsonify({"status": "ok", "action": action, "trained": False})

    @app.route("/metrics", methods=["GET"])
    def metrics():
        cache = service.segmenter.cache
        return jsonify({"embedding_cache_hits": cache.hits, "embedding_cache_misses": cache.misses,
                        "embedding_cache_images": len(cache), "embedding_cache_bytes": cache.nbytes,
                        "encodes": service.segmenter.encodes,
                        "click_embeddings": service.segmenter.interactive_requests,
                        "click_embeddings_waited": service.segmenter.interactive_waits,
                        **service.store_metrics()})

    return app


def build_app(settings: Settings) -> Flask:
    """Load the model (and download its checkpoint if allowed), then return the app."""
    app = create_app(PredictionService.from_settings(settings))
    # After loading, the process tracks a few hundred thousand long-lived objects (torch, timm,
    # segment_anything); a full collection over them is slow (README "Speed") and lands in the
    # middle of a click. Freezing moves them out of the collector's generations for good.
    gc.collect()
    gc.freeze()
    return app


# -- the command line -----------------------------------------------------------------------------

def serve(args) -> int:
    """Run the app on gunicorn: one process (the model is loaded once), many threads."""
    from gunicorn.app.base import BaseApplication

    settings = settings_from_args(args)

    from sam_backend.server.gunicorn_worker import worker_class

    if args.threads < settings.max_concurrent_loads + 4:
        log.warning("--threads %d leaves fewer than 4 threads beside max_concurrent_loads=%d: "
                    "clicks and /health may wait behind image loads", args.threads,
                    settings.max_concurrent_loads)

    class Server(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", 1)
            # gthread, with a deadline for receiving each request (request_timeout)
            self.cfg.set("worker_class", worker_class(settings.request_timeout))
            self.cfg.set("threads", args.threads)
            # idle kept-alive connections wait in the poller, not in a thread; 2 s (gunicorn's
            # default) makes clients that pause between clicks race the server's close
            self.cfg.set("keepalive", 10)
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
    add_listen_arguments(parser)
    parser.add_argument("--threads", type=int, default=32,
                        help="request threads (default 32; at most max_concurrent_loads of them "
                             "load new images, the rest stay free for clicks and /health)")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    add_option_arguments(parser)
    parser.set_defaults(func=serve)
