"""Bridges from bitpress checkpoints to other runtimes (ONNX Runtime, OpenVINO).

Each submodule imports its runtime lazily and raises a :class:`bitpress.errors.BitpressError`
saying which extra to install when it is missing."""
