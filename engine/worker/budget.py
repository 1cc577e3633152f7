"""Which networks a GPU worker keeps resident: a byte budget for the weights of all of them
(``capacity.network_bytes``) and a count for those with their own session
(``capacity.models_per_device``), least recently used out, never one with work in flight."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("engine.inference")


def victims(models: Mapping[str, Any], new: Any, capacity: int, budget: int | None,
            busy: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The networks to evict, least recently used first (``models`` is in that order), so that
    ``new`` fits: at most ``capacity`` with their own session (``arch`` None) when ``new`` has one,
    and at most ``budget`` weight bytes in all. Never a name in ``busy``; when only such networks
    are left, the budget is exceeded and a warning says so."""
    kept = dict(models)
    kept.pop(new.name, None)
    out: list[str] = []
    while True:
        own = new.arch is None and sum(x.arch is None for x in kept.values()) >= capacity
        heavy = budget is not None and sum(x.weight_bytes for x in kept.values()) + new.weight_bytes > budget
        if not (own or heavy):
            return out
        victim = next((n for n, x in kept.items() if n not in busy and (heavy or x.arch is None)), None)
        if victim is None:
            log.warning("%s: over the network budget (%d bytes, %d own sessions) with every other network "
                        "busy; all kept", new.name, sum(x.weight_bytes for x in kept.values()) + new.weight_bytes,
                        sum(x.arch is None for x in kept.values()) + (new.arch is None))
            return out
        del kept[victim]
        out.append(victim)


def auto_budget(device: int | None, slots: int) -> int:
    """``capacity.network_bytes = "auto"``: half the memory free now (the GPU's, the host's for the
    CPU provider), divided among the ``slots`` workers of the device."""
    import psutil
    free = psutil.virtual_memory().available
    if device is not None:
        try:
            import pynvml
            pynvml.nvmlInit()
            try:
                free = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device)).free
            finally:
                pynvml.nvmlShutdown()
        except Exception as e:  # noqa: BLE001 - no NVML: the host's memory is the bound we know
            log.warning("GPU %s: free memory unknown (NVML: %s); network budget from host memory", device, e)
    return max(1 << 20, free // 2 // max(1, slots))
