"""``captioner serve``: a web page and JSON API for captioning images and showing attention.

Needs the ``serve`` extra (``pip install 'captioner[serve]'``: FastAPI, uvicorn, python-multipart).
"""

from captioner.serve.app import ServeStats, create_app

__all__ = ["ServeStats", "create_app"]
