"""The supervisor role: owns the shared memory, starts and watches the front, the GPU workers and
the compositors, serves the control socket (control: its client side) and the metrics endpoint.

May import: engine.runtime, engine.front, engine.worker, engine.compositor.
"""
