"""The HTTP layer: the Flask app and its routes (:mod:`.app`), basic auth, and the gunicorn
worker class. Thin: it parses and formats, and each route calls the Label Studio layer's
:class:`~sam_backend.labelstudio.service.PredictionService` directly."""
