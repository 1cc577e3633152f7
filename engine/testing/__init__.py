"""For the people who test their deployment: a pytest plugin (``plugin``, registered as the
``lipsync_engine`` pytest11 entry point) with an engine to test against (``engine``: started from a
config in a temporary run dir, or an existing one) and latency measurements reported through
pytest-benchmark with percentiles (``measure``). docs/latency-suites.md says how to use it.

May import: engine.protocol, engine.client, engine.runtime, engine.audio, engine.avatars, engine.cli, engine.supervisor.
"""
