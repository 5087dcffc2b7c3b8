"""The only package that knows KVM's ioctl numbers and struct layouts.

``bindings`` mirrors linux/kvm.h; ``system`` wraps the three fd levels (``Kvm``, ``VmFd``,
``VcpuFd``); ``host`` tells hardware virtualization from PVM from no usable KVM; ``stats``
reads KVM's binary statistics (its own exit counters).
"""

from kasou.kvm.system import Kvm, VcpuFd, VmFd

__all__ = ["Kvm", "VcpuFd", "VmFd"]
