"""Inference: ``load_model`` and the ``Classifier`` (``predict``), what it returns (``results``)
and Grad-CAM (``explain``)."""
