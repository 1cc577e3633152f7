"""The GPU worker role: one process per (GPU, slot) running the avatars' networks with ONNX Runtime
(gpu_worker: the process loop; inference: the compute core, no sockets), fp16 conversion and its
error report (precision), the batch-size buckets it warms up (buckets).

May import: engine.protocol, engine.runtime, engine.audio, engine.kernels, engine.avatars.
"""
