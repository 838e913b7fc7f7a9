"""Memory limits checked before any work (both engines): this machine's memory, and what a simulation needs.

A simulation keeps every trace record: measured at about 1.4 KB (tiny model, 2 nodes) to 3.8 KB (8 nodes) per
generated token and node (``tracemalloc`` peak of ``simulate``), so ``SIM_BYTES_PER_TOKEN_NODE`` is 4 KB.
"""

from __future__ import annotations

import os
from pathlib import Path

from .scenario import Scenario, ScenarioError

SIM_BYTES_PER_TOKEN_NODE = 4096
REFUSE_SHARE = 0.8  # refuse above this share of the machine's physical memory


def machine_memory() -> tuple[int, int] | None:
    """(total, available) bytes of this machine's memory, or None where it cannot be read."""
    meminfo = Path("/proc/meminfo")
    try:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()
                  if line.split()[1:2] and line.split()[1].isdigit()}
        return fields["MemTotal"], fields.get("MemAvailable", fields["MemTotal"])
    except (OSError, KeyError, ValueError, IndexError):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
        return total, total


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_simulation_memory(scenario: Scenario, memory: tuple[int, int] | None = None) -> None:
    """Refuse (ScenarioError, one line) a simulation whose trace would not fit in this machine's memory."""
    memory = memory if memory is not None else machine_memory()
    if memory is None:
        return
    tokens, nodes = scenario.workload.generate_tokens, scenario.cluster.count
    need = tokens * nodes * SIM_BYTES_PER_TOKEN_NODE
    if need > REFUSE_SHARE * memory[0]:
        raise ScenarioError(f"workload.generate_tokens={tokens} on {nodes} nodes needs about {gb(need)} of trace "
                            f"records, more than {REFUSE_SHARE:.0%} of this machine's {gb(memory[0])}: "
                            "simulate fewer tokens")
