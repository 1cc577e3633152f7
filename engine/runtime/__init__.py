"""What every process shares: the typed config tree (engine.toml), the process base class with its
heartbeat and backend channel, shared-memory segments and the batch ring, logs, metrics recording,
CURVE key files. No role of its own.

May import: engine.protocol.
"""
