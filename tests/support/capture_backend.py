"""A stand-in ML backend that records what Label Studio sends it: every request's method, path
and JSON body, one line each in ``--log``; ``/predict`` is answered with the JSON in ``--answer``
when that file exists (read on each request, so a test can change it), else with no result.
Used to capture the real video protocol of Label Studio 1.23.2 (``docs/video-protocol.md``).

    python -m tests.support.capture_backend --port 9099 --log requests.jsonl --answer answer.json
"""
from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def serve(port: int, log: Path, answer: Path, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # the JSONL log is the record
            pass

        def _record(self, body):
            with lock, open(log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"method": self.command, "path": self.path,
                                     "body": body}) + "\n")

        def _reply(self, payload, status=200):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._record(None)
            if self.path.startswith("/health"):
                return self._reply({"status": "UP", "model_class": "Capture"})
            if self.path.startswith("/versions"):
                return self._reply({"versions": ["capture-1"]})
            self._reply({"error": "not found"}, 404)

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode("utf-8", "replace")
            self._record(body)
            if self.path.startswith("/setup"):
                return self._reply({"model_version": "capture-1"})
            if self.path.startswith("/predict"):
                if answer.exists():
                    return self._reply(json.loads(answer.read_text()))
                return self._reply({"results": []})
            self._reply({"status": "ok"})

    server = ThreadingHTTPServer((host, port), Handler)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--answer", type=Path, required=True)
    args = parser.parse_args()
    serve(args.port, args.log, args.answer).serve_forever()


if __name__ == "__main__":
    main()
