"""The HTTP service: the FastAPI app (``app``), dynamic batching (``batcher``), the API key, origin
policy and security headers (``security``) and the page in ``static/``."""

from ..extras import require

require("serve", "the HTTP service (braintumor.serving)")
