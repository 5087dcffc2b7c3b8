"""``GET /metrics``: the daemon's figures in Prometheus' text format.

The per-VM series are built afresh on every scrape, in a registry that lives for that one
request, from ``Daemon.metrics()`` and ``Daemon.list()``: a deleted VM's series vanish with it
and nothing is cached between scrapes. Only the API's own latency histogram lives as long as
the app, since it accumulates.

Names follow Prometheus' conventions (base units, ``_total`` for counters, ``_bytes``); the
figures' meaning (what a VM's CPU time or PSS covers) is the daemon's (``kasou.daemon``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kasou.daemon import Daemon, VmMetrics
from kasou.spec import VmState

__all__ = ["CONTENT_TYPE", "new_latency_histogram", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def new_latency_histogram() -> Histogram:
    """The API's request latency by route, in no registry until a scrape adds it."""
    return Histogram(
        "kasou_api_request_seconds",
        "Time kasoud took to answer an API request, by route template",
        ["method", "route"],
        registry=None,
    )


class _DaemonCollector(Collector):
    """One scrape's view of the daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> list[Metric]:
        vms = self.daemon.list()
        samples = self.daemon.metrics()
        host = GaugeMetricFamily(
            "kasou_host_vms", "VMs declared on this host, by state", labels=["state"]
        )
        for state in VmState:
            host.add_metric([state.value], sum(1 for vm in vms if vm.state is state))
        return [host, *_vm_families(samples)]


def _vm_families(samples: list[VmMetrics]) -> list[Metric]:
    cpu = CounterMetricFamily(
        "kasou_vm_cpu_seconds", "CPU time of the VM's process, all threads", labels=["vm"]
    )
    rss = GaugeMetricFamily(
        "kasou_vm_memory_rss_bytes", "Resident memory of the VM's process", labels=["vm"]
    )
    pss = GaugeMetricFamily(
        "kasou_vm_memory_pss_bytes", "Proportional set size of the VM's process", labels=["vm"]
    )
    guest = GaugeMetricFamily(
        "kasou_vm_guest_memory_bytes", "Guest RAM the VM was given", labels=["vm"]
    )
    restarts = CounterMetricFamily(
        "kasou_vm_restarts", "Restarts by the VM's restart policy", labels=["vm"]
    )
    exits = CounterMetricFamily(
        "kasou_vm_exits",
        "VM exits that reached kasou (user space), by reason: io, mmio, other",
        labels=["vm", "reason"],
    )
    kvm_exits = CounterMetricFamily(
        "kasou_vm_kvm_exits",
        "VM exits as KVM counts them (its binary statistics, summed over vCPUs), including those "
        'handled in the kernel: reason="all" is every exit; the others (halt, irq, io, mmio, '
        "emulation, page_fault, ...) are KVM's own counters, which overlap: do not sum them",
        labels=["vm", "reason"],
    )
    disk_bytes = CounterMetricFamily(
        "kasou_vm_disk_bytes", "Bytes moved by a virtio disk", labels=["vm", "device", "direction"]
    )
    disk_ops = CounterMetricFamily(
        "kasou_vm_disk_operations",
        "Requests done by a virtio disk",
        labels=["vm", "device", "direction"],
    )
    net_bytes = CounterMetricFamily(
        "kasou_vm_net_bytes",
        "Bytes moved by a virtio net device",
        labels=["vm", "device", "direction"],
    )
    net_packets = CounterMetricFamily(
        "kasou_vm_net_packets",
        "Packets moved by a virtio net device",
        labels=["vm", "device", "direction"],
    )
    for sample in samples:
        vm = sample.name
        cpu.add_metric([vm], sample.cpu_seconds)
        rss.add_metric([vm], sample.memory_rss)
        pss.add_metric([vm], sample.memory_pss)
        guest.add_metric([vm], sample.guest_memory)
        restarts.add_metric([vm], sample.restarts)
        for reason, count in sample.exits.items():
            exits.add_metric([vm, reason], count)
        for reason, count in sample.kvm_exits.items():
            kvm_exits.add_metric([vm, reason], count)
        for family, table in (
            (disk_bytes, sample.disk_bytes),
            (disk_ops, sample.disk_ops),
            (net_bytes, sample.net_bytes),
            (net_packets, sample.net_packets),
        ):
            for device, directions in table.items():
                for direction, value in directions.items():
                    family.add_metric([vm, device, direction], value)
    families = [cpu, rss, pss, guest, restarts, exits, kvm_exits]
    return [*families, disk_bytes, disk_ops, net_bytes, net_packets]


def render(daemon: Daemon, latency: Histogram) -> bytes:
    """The text of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_DaemonCollector(daemon))
    registry.register(latency)
    return generate_latest(registry)
