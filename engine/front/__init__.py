"""The front role: the client ROUTER socket and the backend socket (front: loop and I/O; requests:
request handling; pipeline: a job from ring slot to reply), the stream methods and per-stream state,
the scheduler (pure, simulated-time tested), connections and their bounds, quotas, CURVE security.

May import: engine.protocol, engine.runtime, engine.audio, engine.kernels, engine.avatars.
"""
