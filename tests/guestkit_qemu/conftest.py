"""The QEMU peer runner lives with the benchmarks (bench/qemu_peer.py); these tests use it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
