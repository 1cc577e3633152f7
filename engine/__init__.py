"""lipsync-engine: a real-time lip-sync video engine.

Process roles: :mod:`engine.supervisor.supervisor` (spawns and watches everything), :mod:`engine.front.front`
(ZeroMQ ROUTER front, scheduling), :mod:`engine.worker.gpu_worker` (one per GPU slot, ONNX Runtime),
:mod:`engine.compositor.compositor` (paste-back and JPEG). Kernels in :mod:`engine.kernels.image`, the wire
protocol in :mod:`engine.protocol`, clients in :mod:`engine.client`.
"""
__version__ = "0.1.0"
