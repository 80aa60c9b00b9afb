"""The HTTP layer: the Flask app and its routes (:mod:`.app`), basic auth, and the WSGI server
both start commands run it on (:mod:`.http`, waitress with a whole-request deadline). Thin: it
parses and formats, and each route calls the Label Studio layer's
:class:`~sam_backend.labelstudio.service.PredictionService` directly."""
