"""The HTTP layer: the routes Label Studio calls, and the ``sam-backend serve`` command.

Thin: each route parses the request, calls the :class:`PredictionService` (the Label Studio
layer) and formats its answer. ``label-studio-ml start sam`` (``sam/_wsgi.py``) and
``sam-backend serve`` both serve :func:`build_app`.

Routes (what Label Studio 1.23 calls, and how long it waits):
- ``GET /health`` and ``GET /`` (1 s): answers once the model is loaded; names variant, runtime
  and device.
- ``POST /setup`` (3 s): remembers the project's label config and Label Studio's address and
  token; loads nothing.
  Answers the project's trained version as its ``model_version`` when it has one.
- ``POST /predict``: one smart-tool click (or a task opened: no context -> the project's promoted
  trained version's instances, or with ``auto_annotate`` the concept engine's, else an empty
  answer; the image starts encoding in the background). Needs no prior /setup: the request
  carries its ``label_config``.
- ``POST /webhook``: Label Studio 1.23's *Start Training* (``START_TRAINING``) starts a training
  run of the project (answered at once with the run's ``job``); ``ANNOTATION_CREATED`` /
  ``ANNOTATION_UPDATED`` / ``ANNOTATIONS_CREATED`` count toward ``train_every`` (when it is
  on; an event without a project is acknowledged uncounted); a video task's
  ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` also has its boxes tracked and the tracks
  written to the task when done (``video_deliver``); every other event is acknowledged.
  ``POST /train``: *Start Training* of older Label Studio.
  ``GET /train/status?project=ID``: the project's run state, progress, last report, versions.
- ``GET|POST /versions``, ``GET /metrics`` (memory hits/misses, encoder runs, with a shared store
  its hits, misses, writes, corrupt entries, lock waits and the precompute queue's length; the
  training runs' counters and the trained versions served).

Errors are JSON ``{"status": "error", "errors": [message]}``: 400 for a request that cannot be
answered as sent, 500 (with a generic message; the trace goes to the log) for a bug. The server
keeps serving either way.
"""
from __future__ import annotations

import gc
import json
import logging
import time
from typing import Any, Dict, List, Optional

import ujson
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, RequestTimeout

from sam_backend.common.deadline import ClientGone, WorkScope
from sam_backend.common.limits import MIB, printable, release_memory_if_due, shown
from sam_backend import assembly
from sam_backend.errors import BusyError, ConfigError, RequestError, SamBackendError
from sam_backend.labelstudio.service import PredictionService, project_id
from sam_backend.training import serving
from sam_backend.training.jobs import TrainingJobs
from sam_backend.training.versions import VersionStore
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
    """The request body, at most ``limit`` bytes (413 past it, with or without Content-Length).
    The server has it whole already (server/http.py answers 408 to a client too slow to send
    it); the 408 below is for a WSGI server that streams the body instead."""
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


# Label Studio's training triggers (PROTOCOL.md "Training"): Start Training (1.23.2: to /webhook;
# older: to /train), and the annotation events its auto-created webhook sends
START_TRAINING = "START_TRAINING"
ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
#: the events whose video boxes are tracked and written back (README "Video")
VIDEO_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")


def _project_of(body: Dict[str, Any], where: str) -> int:
    """The project id a training trigger names (``project``: an object with ``id``, an id, or
    ``"<id>.<timestamp>"``; an annotation event's task or annotation may carry it instead); a
    400 naming ``where`` when there is none."""
    candidates = [body.get("project")]
    for key in ("task", "annotation"):
        value = body.get(key)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, dict):
            candidates.append(value.get("project"))
    for value in candidates:
        number = project_id(value)
        if number is not None:
            return number
    raise RequestError(f"{where} names no project: send \"project\": {{\"id\": <id>}} (or the "
                       f"project id)")


def _annotations_in(action: str, body: Dict[str, Any]) -> int:
    """How many annotations an annotation event carries: one, or for ANNOTATIONS_CREATED the
    annotations (or ids) it lists (one when it lists none: the event still says some came)."""
    if action != "ANNOTATIONS_CREATED":
        return 1
    for key in ("annotation", "annotations"):
        value = body.get(key)
        if isinstance(value, list):
            return len(value)
    return 1


def create_app(service: PredictionService, jobs: Optional["TrainingJobs"] = None) -> Flask:
    """The Flask app around a ready service (its model is already loaded). ``jobs``: what starts
    training runs (None: this app does not train; the training routes say so)."""
    app = Flask("sam_backend")
    # Keep the order the routes build. Flask >= 2.2 reads app.json (constraints.txt pins 3.x);
    # the config key is what a venv still on label-studio-ml's Flask 1.1.2 reads.
    if hasattr(app, "json"):
        app.json.sort_keys = False
    else:
        app.config["JSON_SORT_KEYS"] = False
    body_limit = int(service.settings.max_request_mb * MIB)
    # The server refuses larger bodies before the app (server/http.py); _read_body checks again.
    # Werkzeug bounds a server-terminated stream at MAX_CONTENT_LENGTH and answers 413 to the
    # read that finds the end of a body of exactly that size: one byte of room for that read.
    app.config["MAX_CONTENT_LENGTH"] = body_limit + 1
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
        # (no Connection header: WSGI apps may not set it; the server closes after its own
        # 408 and 413, which it answers before the app sees the request)
        return _error(f"{exc.code} {exc.name}: {exc.description}", exc.code or 500)

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
        project = _optional(body, "project", (str, int), "a string or an integer")
        service.setup(project,
                      _optional(body, "schema", str, "the labeling config XML (a string)"),
                      _optional(body, "hostname", str, "a URL string"),
                      _optional(body, "access_token", str, "a string"),
                      authenticated=auth.enabled and g.authenticated)
        # a project with a promoted trained version: Label Studio shows that version
        return jsonify({"model_version": service.model_version_for(project)})

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
            first = results[0] if results and isinstance(results[0], dict) else {}
            response = _json_response({"results": results, "model_version": first.get(
                "model_version", service.model_version)})
        except BaseException:
            held.release()
            raise
        response.call_on_close(held.release)
        return response

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        return jsonify({"versions": [service.model_version], "model_version": service.model_version})

    def training_jobs() -> "TrainingJobs":
        if jobs is None:
            raise ConfigError("this backend does not train (it was started without training "
                              "jobs): start it with `sam-backend serve`")
        return jobs

    def run_credentials():
        """Label Studio's address and token for a run: the settings', else what /setup sent.
        Without them the run fails and its status says why."""
        try:
            return service.images.label_studio_credentials()
        except SamBackendError as exc:
            log.warning("a training run gets no Label Studio token: %s", exc)
            return service.images.label_studio_url, None

    def start_training(body: Dict[str, Any], where: str, reason: str):
        project = _project_of(body, where)
        url, token = run_credentials()
        answer = training_jobs().request(project, reason, url, token)
        log.info("training of project %s requested (%s): %s", project, reason,
                 answer.get("status"))
        # Label Studio keeps a train-job record only when the answer has "job"
        return jsonify({"status": "ok", "project": project, "run": answer.get("status"),
                        "job": answer.get("job")})

    @app.route("/webhook", methods=["POST"])
    def webhook():
        try:
            body = _json_body(body_limit)
        except RequestError:
            body = {}
        action = body.get("action")
        action = printable(action, 100) if isinstance(action, str) else None
        if action == START_TRAINING:
            return start_training(body, "START_TRAINING", "Start Training in Label Studio")
        tracking = None
        if action in VIDEO_EVENTS and service.video is not None:
            # a video task's boxes, submitted or corrected: tracked, written to the task when done
            tracking = service.video.track_annotation(body)
        if action in ANNOTATION_EVENTS and service.settings.train_every:
            try:
                project = _project_of(body, action)
            except RequestError as exc:
                # a webhook without its payload (Label Studio lets one be switched off): the
                # event cannot count, and failing it would help nobody
                log.warning("webhook %s not counted toward train_every: %s", action, exc)
                return jsonify({"status": "ok", "action": action, "counted": False})
            count = _annotations_in(action, body)
            url, token = run_credentials()
            answer = training_jobs().annotation_event(project, count, url, token)
            reply = {"status": "ok", "action": action, "project": project, "annotations": count}
            if answer:  # train_every reached: a run started or queued
                reply.update(run=answer.get("status"), job=answer.get("job"))
            if tracking:
                reply["tracking"] = tracking
            return jsonify(reply)
        # every other event is acknowledged: a webhook answer never fails Label Studio's delivery
        log.debug("webhook %s acknowledged", action)
        return jsonify({"status": "ok", "action": action,
                        **({"tracking": tracking} if tracking else {})})

    @app.route("/train", methods=["POST"])
    def train():
        # older Label Studio posts Start Training here: {"annotations", "project": "<id>.<ts>",
        # "label_config", "params"}; the run reads the project from Label Studio's API itself
        return start_training(_json_body(body_limit), "/train", "Start Training (/train)")

    @app.route("/train/status", methods=["GET"])
    def train_status():
        raw = request.args.get("project")
        project = project_id(raw)
        if project is None:
            raise RequestError(f"/train/status needs ?project=<project id>, got "
                               f"{shown(raw) if raw is not None else 'none'}")
        status = dict(training_jobs().status(project))
        if service.trained is not None:
            status["served_here"] = service.trained.serving().get(str(project))
        return jsonify(status)

    @app.route("/metrics", methods=["GET"])
    def metrics():
        cache = service.segmenter.cache
        training = {f"training_{k}": v for k, v in jobs.counters().items()} if jobs else {}
        return jsonify({"embedding_cache_hits": cache.hits, "embedding_cache_misses": cache.misses,
                        "embedding_cache_images": len(cache), "embedding_cache_bytes": cache.nbytes,
                        "encodes": service.segmenter.encodes,
                        "click_embeddings": service.segmenter.interactive_requests,
                        "click_embeddings_waited": service.segmenter.interactive_waits,
                        **service.store_metrics(), **training,
                        **(service.trained.metrics() if service.trained is not None else {})})

    return app


def build_app(settings: Settings) -> Flask:
    """Load the model (and download its checkpoint if allowed), then return the app: it serves
    promoted trained versions (``serve_trained``) and starts training runs (in a background
    process, or on the ``train`` queue with a shared store); ``app.extensions["sam_backend"]``
    holds the ``jobs`` and ``trained`` to close when done."""
    service = assembly.prediction_service(settings)
    trained = serving.attach(service)
    jobs = TrainingJobs(settings, VersionStore.from_settings(settings))
    app = create_app(service, jobs)
    app.extensions["sam_backend"] = {"jobs": jobs, "trained": trained, "service": service,
                                     "tracking": service.video.jobs if service.video else None,
                                     "deliveries": service.video.deliveries if service.video
                                     else None}
    # After loading, the process tracks a few hundred thousand long-lived objects (torch, timm,
    # segment_anything); a full collection over them is slow (README "Speed") and lands in the
    # middle of a click. Freezing moves them out of the collector's generations for good.
    gc.collect()
    gc.freeze()
    return app


# -- the command line -----------------------------------------------------------------------------

def serve(args) -> int:
    """Run the app on waitress (:mod:`sam_backend.server.http`): one process (the model is loaded
    once, before the port opens), a pool of ``--threads`` threads that only ever get complete
    requests."""
    from sam_backend.server import http

    settings = settings_from_args(args)
    if args.threads < 1:
        raise SamBackendError(f"--threads {args.threads}: at least 1")
    busy = settings.max_concurrent_loads + settings.max_concurrent_downloads
    if args.threads < busy + 4:
        log.warning("--threads %d leaves fewer than 4 threads beside max_concurrent_loads=%d and "
                    "max_concurrent_downloads=%d: clicks and /health may wait behind image loads",
                    args.threads, settings.max_concurrent_loads, settings.max_concurrent_downloads)
    app = build_app(settings)
    try:
        http.run(app, settings, args.host, args.port, threads=args.threads,
                 access=args.access_log)
    except OSError as exc:
        raise SamBackendError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    finally:
        close_app(app)
    return 0


def close_app(app: Flask) -> None:
    """Stop what :func:`build_app` started beside the routes (training jobs, trained models,
    background tracking and its deliveries to Label Studio)."""
    parts = app.extensions.get("sam_backend") or {}
    for name in ("jobs", "trained", "tracking", "deliveries"):
        if parts.get(name) is not None:
            parts[name].close()


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the backend on a production WSGI server (waitress: requests are read "
                 "in an event loop, complete ones run in a thread pool)")
    add_listen_arguments(parser)
    parser.add_argument("--threads", type=int, default=32,
                        help="request threads (default 32; a thread only gets a request that has "
                             "fully arrived; at most max_concurrent_loads + "
                             "max_concurrent_downloads of them load new images, the rest stay "
                             "free for clicks and /health)")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    add_option_arguments(parser)
    parser.set_defaults(func=serve)
