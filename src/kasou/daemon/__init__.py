"""The host daemon's core (kasoud without HTTP): declared VMs, their processes and events.

``Daemon`` keeps a table of VMs (specs in a ``Store``), starts each VM as its own
``kasou run`` process forked from a warm template, watches those processes, applies restart
policies and records every change as an ``Event``. Front ends (the REST API, the tests) call
its methods from any thread; none of them reaches a VM's process except through it.

It does not speak HTTP (``kasou.api``) and does not run guests itself: a VM's process does
(``kasou.vmm``), reached through its control socket (``kasou.client.control``).
"""

from __future__ import annotations

import logging

from kasou.daemon._daemon import Daemon, RestartTiming, VmMetrics, VmPaths
from kasou.daemon._store import SqliteStore, Store, VmRecord

__all__ = ["Daemon", "RestartTiming", "SqliteStore", "Store", "VmMetrics", "VmPaths", "VmRecord"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
