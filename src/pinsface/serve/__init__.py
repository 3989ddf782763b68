"""``pinsface serve``: a REST API and a web page over a trained run (needs the ``serve`` extra). How its parts fit,
and the path of one photo from upload to name (router -> batcher -> recogniser): ``app.py``'s docstring."""

from pinsface.serve.app import ServeSettings, create_app, serve

__all__ = ["ServeSettings", "create_app", "serve"]
