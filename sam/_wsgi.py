"""Entry point of ``label-studio-ml start sam [--with key=value ...] [-p PORT] [--host HOST]``.

label-studio-ml runs ``python sam/_wsgi.py <its arguments>``; this file takes the same arguments
as label-studio-ml's own template and serves the sam_backend app on the same server as
``sam-backend serve`` (waitress, :func:`sam_backend.server.http.run`, 32 threads): a thread only
ever gets a request that has fully arrived.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sam_backend.errors import SamBackendError  # noqa: E402
from sam_backend.server import http  # noqa: E402
from sam_backend.server.app import build_app, close_app  # noqa: E402
from sam_backend.settings import add_listen_arguments, from_environment, settings_from_args  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description="sam_backend for Label Studio")
    add_listen_arguments(parser)
    parser.add_argument("--kwargs", "--with", dest="kwargs", metavar="KEY=VAL", nargs="+",
                        help="backend options, e.g. model_name=mobile_sam device=cpu")
    parser.add_argument("-d", "--debug", action="store_true",
                        help="debug logging (the Werkzeug debugger is never enabled)")
    parser.add_argument("--log-level", default=from_environment("LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--model-dir", default=None, help="accepted for compatibility; unused")
    parser.add_argument("--check", action="store_true",
                        help="load the model, then exit without serving")
    args = parser.parse_args()

    logging.basicConfig(level="DEBUG" if args.debug else args.log_level,
                        format="[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s")
    log = logging.getLogger("sam_backend")
    try:
        settings = settings_from_args(args)
        app = build_app(settings)
    except SamBackendError as exc:
        log.error("%s", exc)
        return 2
    try:
        if args.check:
            log.info("model loaded; --check given, not serving")
            return 0
        http.run(app, settings, args.host, args.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 2
    finally:
        close_app(app)  # a training run going on is asked to stop (the served version stays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
