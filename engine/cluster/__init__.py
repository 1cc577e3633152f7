"""The cluster role: many engines, one per host, behind Ray Serve as the control plane. Each host's
engine stays the data plane (clients connect to it directly and speak the protocol); Ray Serve runs
one agent per host (agent: what its engine holds, loads on request), a router that picks the host
for an avatar (router; ranking: the pure policy, shared with tools/placement_sim.py), the resolve
path (resolve: HTTP and DeploymentHandle callers) and ``engine-ctl cluster`` (emulate: N engines
as N Ray nodes on one machine). Ray is an optional extra (``pip install 'lipsync-engine[cluster]'``):
only ranking and resolve import without it.

May import: engine.protocol, engine.runtime, engine.client.
"""
