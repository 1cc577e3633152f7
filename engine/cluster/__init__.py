"""The cluster role: many engines, one per host, behind Ray Serve as the control plane. Each host's
engine stays the data plane (clients connect to it directly and speak the protocol); Ray Serve runs
one agent per host (agent: what its engine holds, loads on request) and a router that picks the
host for an avatar (router, over table: its state; ranking: the pure policy, shared with
tools/placement_sim.py; listener: its own HTTP port, the resolve path without Serve's proxy); deploy puts them on a Ray cluster. The client side of a resolve is
engine.client.resolve, ``engine-ctl cluster`` is engine.cli.cluster_cmds (and cluster_emulate).
Ray is an optional extra (``pip install 'lipsync-engine[cluster]'``), imported only inside the
functions that need it: every module here imports without it.

May import: engine.protocol, engine.runtime, engine.client.
"""
