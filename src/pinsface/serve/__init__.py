"""``pinsface serve``: a REST API and a web page over a trained run (needs the ``serve`` extra)."""

from pinsface.serve.app import ServeSettings, create_app, serve

__all__ = ["ServeSettings", "create_app", "serve"]
