"""The model and its spec: what a weights file holds and how it runs.

- ``registry``: the architectures (``ARCHITECTURES``), their initialisations, the one loader of a
  weights file (``load_weights_file``);
- ``spec``: ``ModelSpec``, read and validated once from a weights or ONNX file;
- ``checkpoint``: safetensors weights with metadata, resumable training checkpoints;
- ``network``: the ``Network`` interface, the torch implementation and ``load_network``;
- ``onnx_backend``: ONNX export, the ONNX Runtime implementation, the shipped and cached graphs;
- ``runtime``: device, autocast and memory layout of a torch network;
- ``ood``: the not-a-brain-MRI guard and the validated range.
"""
