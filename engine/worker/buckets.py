"""The bucket policy: the few batch sizes a network (and audio encoder) is run at.

On a GPU every input shape ONNX Runtime has not seen costs set-up time (cuDNN algorithm choice,
memory plans; about 2 s per new shape on the H200, docs/performance.md), and stream jobs come
in every size. So a GPU worker runs a network only at a fixed set of batch sizes, all warmed up
before the network serves anything: a batch of ``n`` frames is cut into pieces of the largest
size while it is larger, and the rest is padded up to the smallest size that holds it. Padded
rows are computed and ignored (every op of a lip-sync network is per frame).

``gpu.batch_buckets`` chooses the sizes: ``"auto"`` (:data:`AUTO_BUCKETS` up to ``ring.max_batch``
on a GPU; exact sizes on the CPU provider, where a new shape costs little and padding costs
compute), ``"off"`` (exact sizes everywhere) or an explicit list (used on any provider, which is
how the policy is exercised without a GPU). A graph exported with a fixed batch has exactly one
size. The audio encoder follows the network: when the network is bucketed, its window count
is padded to a power of two from 16 up to the most windows a ring slot's job can carry.

Pure functions, no ONNX Runtime: the worker and the benchmarks share them.
"""
from __future__ import annotations

AUTO_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 50)
ENCODER_MIN = 16                  # the fewest windows a stream job carries (one frame: its 16-frame context)
WINDOWS_PER_FRAME = 16            # a stream segment of c frames carries at most c + 15 windows


def network_buckets(setting: str | tuple[int, ...], gpu: bool, max_batch: int,
                    fixed_batch: int | None = None) -> tuple[int, ...] | None:
    """The batch sizes a network runs at, or None for exact sizes.

    ``setting`` is ``gpu.batch_buckets``; ``gpu`` whether the worker runs the CUDA provider.
    """
    if fixed_batch:
        return (fixed_batch,)
    if setting == "off" or (setting == "auto" and not gpu):
        return None
    if setting == "auto":
        return tuple(b for b in AUTO_BUCKETS if b < max_batch) + (max_batch,)
    sizes = tuple(b for b in setting if b <= max_batch)
    return sizes or (max_batch,)


def encoder_buckets(enabled: bool, max_batch: int) -> tuple[int, ...] | None:
    """Window counts the audio encoder runs at: powers of two from 16 to the first one that holds
    the most windows a job of ``max_batch`` frames can carry (each frame its own segment)."""
    if not enabled:
        return None
    most = max_batch * WINDOWS_PER_FRAME
    sizes = [ENCODER_MIN]
    while sizes[-1] < most:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes)


def plan(n: int, sizes: tuple[int, ...] | None) -> list[tuple[int, int]]:
    """Pieces ``(start, size)`` that run ``n`` rows at the given sizes (None: one piece of ``n``).

    Rows ``start .. start + size`` of the last piece may reach past ``n``: those are padding.
    """
    if n <= 0:
        return []
    if not sizes:
        return [(0, n)]
    top = sizes[-1]
    pieces, start = [], 0
    while n - start > top:
        pieces.append((start, top))
        start += top
    rest = n - start
    pieces.append((start, next(b for b in sizes if b >= rest)))
    return pieces


def rows_needed(n: int, sizes: tuple[int, ...] | None) -> int:
    """Rows the pieces of :func:`plan` span (``n`` plus the last piece's padding)."""
    pieces = plan(n, sizes)
    return pieces[-1][0] + pieces[-1][1] if pieces else 0
