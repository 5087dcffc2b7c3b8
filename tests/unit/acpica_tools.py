"""Debian's acpica-tools as a test oracle for the ACPI tables and AML kasou writes.

``iasl -d`` disassembles a table (and checks its checksum and layout as it goes), ``iasl``
compiles ASL, and ``acpiexec`` loads tables into an ACPICA namespace the way the kernel's
ACPICA does at boot, printing the same "Firmware Warning" lines Linux would log.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

__all__ = [
    "acpiexec",
    "definition_block",
    "disassemble",
    "iasl_compile",
    "needs_acpica",
]

needs_acpica = pytest.mark.skipif(
    shutil.which("iasl") is None or shutil.which("acpiexec") is None,
    reason="iasl/acpiexec missing (apt-get install acpica-tools)",
)

# What iasl writes into a disassembly when a table is malformed: "/**** ACPI table terminates
# in the middle of a data structure!", "/* Incorrect checksum, should be 77 */", ...
_COMPLAINTS = re.compile(r"\*\*\*\*|Incorrect checksum|Invalid|Error|Warning", re.IGNORECASE)


def definition_block(body: bytes, signature: bytes = b"DSDT") -> bytes:
    """``body`` under an ACPI 6.5 §5.2.6 header (revision 2, checksummed)."""
    header = struct.pack(
        "<4sIBB6s8sI4sI", signature, 36 + len(body), 2, 0, b"KASOU ", b"TEST", 1, b"TEST", 1
    )
    table = bytearray(header + body)
    table[9] = -sum(table) & 0xFF
    return bytes(table)


def disassemble(table: bytes, directory: Path, name: str) -> str:
    """``iasl -d`` of ``table``; the disassembly, after checking iasl found nothing wrong.

    Comments and data tables' ``[offset]`` columns are dropped and runs of white space made
    one space, so tests can look for ``IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08, )`` or
    ``SCI Interrupt : 0009`` whatever iasl's layout.
    """
    (directory / f"{name}.dat").write_bytes(table)
    result = subprocess.run(
        ["iasl", "-d", f"{name}.dat"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    listing = directory / f"{name}.dsl"
    assert result.returncode == 0 and listing.exists(), f"iasl -d {name}:\n{output}"
    assert not _COMPLAINTS.search(output.split("Copyright", 1)[-1]), output
    source = listing.read_text()
    complaints = [line for line in source.splitlines() if _COMPLAINTS.search(line)]
    assert not complaints, f"iasl -d {name}: {complaints}"
    return _plain(source)


def _plain(source: str) -> str:
    source = re.sub(r"\s*/\*.*?\*/", "", source, flags=re.DOTALL)
    source = re.sub(r"\s*//[^\n]*", "", source)
    source = re.sub(r"\[[0-9A-F]{3}h \d{4}\s+\d+\]", "", source)  # data tables' offsets
    return " ".join(source.split())


def iasl_compile(directory: Path, source: str, output: str) -> bytes:
    """Compile ``source`` (a file in ``directory``) without optimisations; the AML table."""
    result = subprocess.run(
        ["iasl", "-oa", "-p", output, source],
        check=False,
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 Errors, 0 Warnings" in result.stdout, result.stdout
    return (directory / f"{output}.aml").read_bytes()


def acpiexec(directory: Path, tables: Sequence[tuple[str, bytes]], commands: str) -> list[str]:
    """Load ``tables`` (name, bytes) into acpiexec, run ``commands`` (``;``-separated), and
    return its output lines after checking ACPICA logged no firmware warning or error."""
    for name, table in tables:
        (directory / f"{name}.dat").write_bytes(table)
    result = subprocess.run(
        ["acpiexec", "-b", commands, *(f"{name}.dat" for name, _ in tables)],
        check=False,
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 0, "\n".join(lines)
    # "Unexpected ... (aetests-N)" lines are acpiexec's own self-test poking at hardware the
    # tables do not have (GPE blocks, PM2_CNT); they are not about the tables. The same
    # self-test installs a level-triggered handler on GPE 0, which ACPICA answers with "GPE
    # type mismatch (level/edge)" when the tables give GPE 0 an edge method (_E00).
    complaints = [
        line
        for line in lines
        if re.search(r"Firmware (Warning|Error)|ACPI (Warning|Error|Exception)", line)
        and "aetests-" not in line
        and "GPE type mismatch (level/edge)" not in line
    ]
    assert not complaints, "\n".join(complaints)
    return lines
