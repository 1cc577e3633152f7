"""The compositor role: a pool of processes that paste generated faces into the avatar's frames
and encode JPEGs into the ring (the kernels are in engine.kernels).

May import: engine.runtime, engine.kernels, engine.avatars.
"""
