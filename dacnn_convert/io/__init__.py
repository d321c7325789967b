"""Files and models in and out: model sources, checkpoints, exports (ONNX, TorchScript, dense), inspection.

Built on core/ only.
"""
