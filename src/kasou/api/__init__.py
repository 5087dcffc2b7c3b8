"""kasoud's REST API: a FastAPI app on a ``kasou.daemon.Daemon``.

``create_app(daemon, token=None)`` builds it; ``kasoud`` (``kasou.cli.daemon``) serves it on
a Unix socket and optionally on TCP with a bearer token. Requests and answers are the
``kasou.spec`` models, errors are problem+json (``_problems``), and the OpenAPI schema at
``/openapi.json`` is generated from the routes.

Modules: ``_app`` (routes), ``_problems`` (errors to problems), ``_middleware`` (body limit,
token, latency), ``_events`` (server-sent events), ``_console`` (the console WebSocket),
``_files`` (files through the guest agent), ``_operations`` (long work), ``_metrics``
(Prometheus). The web console's static files are in ``web/`` (served at ``/``).

It does not manage VMs itself; every route is one call into the daemon.
"""

from __future__ import annotations

import logging

from kasou.api._app import create_app

__all__ = ["create_app"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
