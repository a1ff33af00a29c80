"""The HTTP service: the FastAPI app (``app``), dynamic batching (``batcher``), the API key, origin
policy and security headers (``security``) and the page in ``static/``."""
