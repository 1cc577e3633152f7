"""The browser player: an HTTP + WebSocket gateway (:mod:`frontends.web.gateway`) and its page (``static/``).

``from frontends.web.gateway import make_app`` (not re-exported here, so that ``python -m
frontends.web.gateway`` runs the module once).
"""
