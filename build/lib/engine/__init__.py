"""lipsync-engine: a real-time lip-sync video engine.

Process roles: :mod:`engine.supervisor` (spawns and watches everything), :mod:`engine.front`
(ZeroMQ ROUTER front, scheduling), :mod:`engine.gpu_worker` (one per GPU slot, ONNX Runtime),
:mod:`engine.compositor` (paste-back and JPEG). Kernels in :mod:`engine.kernels`, the wire
protocol in :mod:`engine.protocol`, clients in :mod:`engine.client`.
"""
__version__ = "0.1.0"
