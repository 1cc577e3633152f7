"""Audio kernels: mel features as the networks were trained on them (mel), and speech helpers
(WAV files, resampling, a deterministic speech signal for demos and benchmarks). Pure functions.

May import: (nothing in engine).
"""
