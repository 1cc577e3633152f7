"""What the supervisor's fork server loads before it forks any engine process.

The supervisor starts its children with multiprocessing's ``forkserver`` method: a fresh
interpreter (never the supervisor itself, whose threads must not be forked) imports this module
once, then forks the front, each GPU worker and each compositor from it, at start and again for
every child that dies. So the roles' modules (numpy, onnxruntime, numba, OpenCV, pyzmq) and the
compositor's numba kernels are loaded once per engine, not once per process and restart.

Nothing here may create a CUDA context, start a thread or open a socket: every child inherits it.
"""
from __future__ import annotations

import logging

from engine.compositor.compositor import Compositor, warm_up_kernels  # noqa: F401 - loaded for the children
from engine.front.front import Front  # noqa: F401
from engine.worker.gpu_worker import GpuWorker  # noqa: F401

try:
    warm_up_kernels()          # numba's cache (or a compile) loaded here, inherited by every compositor
except Exception:              # a compositor warms them up itself, and reports what fails
    logging.getLogger(__name__).exception("the fork server could not load the compositor's kernels")
