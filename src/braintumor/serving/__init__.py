"""The HTTP service: the FastAPI app (``app``), dynamic batching (``batcher``) and the page in
``static/``."""
