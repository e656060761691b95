"""The built-in model kinds, one module each, registered in matching order.

Importing this package registers them (:func:`blackbox_vqa.specs.register_kind`); the
registry imports it the first time it is used.
"""

from __future__ import annotations

from blackbox_vqa.kinds import easyvqa, factory, graph, hf, http, onnx
from blackbox_vqa.specs import register_kind

for _kind in (easyvqa.KIND, hf.KIND, http.KIND, onnx.KIND, graph.KIND, factory.KIND):
    register_kind(_kind, replace=True)
