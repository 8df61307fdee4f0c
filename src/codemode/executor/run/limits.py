"""The limits a guest applies to itself, as the start frame carries them.

The guest caps its address space with ``RLIMIT_AS``. Address space *reserved* counts there,
not memory used: every thread's stack, every malloc arena and a numeric library's buffers
count in full from the start. Where the backend holds each guest to a memory cgroup, which
counts real use, the cap is only a backstop and sits far above the memory limit; where none
does (or a request asked for less than the cgroup allows), the cap *is* the memory limit.
"""

from __future__ import annotations

from typing import Any

from codemode.config import LimitsConfig

#: With a memory cgroup, the address space may reach this multiple of the memory limit …
ADDRESS_SPACE_FACTOR = 8
#: … and at least this much (32 threads' stacks and malloc arenas alone reserve ~2.3 GiB).
MIN_ADDRESS_SPACE_BYTES = 4 << 30


def address_space_bytes(memory_bytes: int, memory_cgroup_bytes: int) -> int:
    """``RLIMIT_AS`` for a guest allowed ``memory_bytes`` whose cgroup holds it to
    ``memory_cgroup_bytes`` (0: no memory cgroup)."""
    if memory_cgroup_bytes <= 0 or memory_bytes < memory_cgroup_bytes:
        return memory_bytes
    return max(ADDRESS_SPACE_FACTOR * memory_bytes, MIN_ADDRESS_SPACE_BYTES)


def guest_limits(limits: LimitsConfig, memory_cgroup_bytes: int) -> dict[str, Any]:
    """The start frame's ``limits``: the execution's, and the address-space cap to apply."""
    out = limits.model_dump()
    out["address_space_bytes"] = address_space_bytes(limits.memory_bytes, memory_cgroup_bytes)
    return out
