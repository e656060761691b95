"""Exporters: a PyTorch VQA model as ``model.onnx`` plus its PyTorch graph, with metadata.

See :func:`blackbox_vqa.exporters.onnx.export_model` and ``bbvqa export``.
"""
