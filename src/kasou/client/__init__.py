"""The Python SDK: clients of a VM's control socket.

Front ends (cli/, later api/ and web/) use it; it never imports the VMM.
"""

from kasou.client.control import ControlClient

__all__ = ["ControlClient"]
