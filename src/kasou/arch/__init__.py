"""Architecture-specific boot state, one subpackage per guest architecture (``x86_64``).

Each subpackage describes, as plain data and writes to guest memory, what a vCPU and guest
memory must hold when the guest starts. Applying it to KVM is the VMM's job (``vmm/``).
"""

__all__: list[str] = []
