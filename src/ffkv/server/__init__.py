"""`ffkv serve`: a local web app over an atlas and its model (overview, memory pages, search, prompt debugger).

``Service`` holds the atlas, the model and the search index; ``create_app(service)`` wraps it in a FastAPI app;
``serve(...)`` does both and runs uvicorn. Needs the ``fastapi`` and ``uvicorn`` packages.
"""

from .app import create_app, serve
from .service import Service

__all__ = ["Service", "create_app", "serve"]
