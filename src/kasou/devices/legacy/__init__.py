"""The PC devices a Linux guest expects at fixed ports, each a pure register machine.

Where the VMM inserts them on the PIO bus (base port, length):

- ``Serial``: 0x3f8, 8 (COM1, ISA IRQ 4, edge-triggered; COM2 would be 0x2f8 and IRQ 3).
- ``I8042``: 0x60, 5, once: offset 0 is port 0x60, offset 4 is port 0x64. No interrupt;
  ``on_reset`` is its reset line.
- ``Rtc``: 0x70, 2 (index and data ports). No interrupt: IRQ 8 is never raised.
- ``AcpiPm``: 0x600, 14 (PM1a event block, PM1a control block with the power-off register at
  0x604, PM timer at 0x608, GPE0 block at 0x60c). The SCI, ISA IRQ 9, is a level line
  (``SciLine``).
"""

from kasou.devices.legacy.i8042 import I8042, I8042State
from kasou.devices.legacy.power import AcpiPm, AcpiPmState, SciLine
from kasou.devices.legacy.rtc import Rtc, RtcState
from kasou.devices.legacy.serial import Serial, SerialState

__all__ = [
    "I8042",
    "AcpiPm",
    "AcpiPmState",
    "I8042State",
    "Rtc",
    "RtcState",
    "SciLine",
    "Serial",
    "SerialState",
]
