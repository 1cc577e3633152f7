"""Entry points: engine-ctl and its commands (main), benchmarks (bench), render to MP4 (render, mp4),
the demo and bench avatars (demo_avatars), avatar check (avatar_check).

May import: engine.protocol, engine.client, engine.runtime, engine.audio, engine.kernels, engine.avatars, engine.worker, engine.front, engine.supervisor, engine.cluster.
"""
