"""The HTTP process: the Flask app and its routes (:mod:`.app`), basic auth, and the gunicorn
worker class. Thin: it parses and formats, and hands each request to the labelstudio service."""
