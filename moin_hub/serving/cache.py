"""The engine's adapter cache: which loaded experts stay on the base model, and which go.

An LRU of loaded PEFT adapters keyed by ``(repo_id, commit sha)``, with a budget in adapters and optionally
in bytes; a pinned adapter or one a running request holds is never evicted. Evictions are decided by the pure
function :func:`plan_evictions`; :class:`AdapterCache` applies them and calls back the engine, which deletes
the PEFT adapter.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Adapters kept loaded on the base model by default.
DEFAULT_CACHE_SIZE = 4

AdapterKey = tuple[str, str]  # (repo_id, commit sha)


def plan_evictions(order: Sequence[Hashable], capacity: int, in_use: Collection[Hashable] = (), *,
                   sizes: Mapping[Hashable, int] | None = None, max_bytes: int | None = None,
                   pinned: Collection[Hashable] = ()) -> list[Hashable]:
    """Which cached adapters to drop so that at most ``capacity`` stay (and, with ``max_bytes``, their sizes
    sum to at most ``max_bytes``): least recently used first.

    Args:
        order: cached keys, least recently used first.
        capacity: how many may stay (>= 0).
        in_use: keys a running request holds; never evicted, even if the cache stays over budget.
        sizes: bytes of each key (missing keys count 0); needed with ``max_bytes``.
        max_bytes: the byte budget, or None for none.
        pinned: keys the user pinned; never evicted.

    Returns:
        The keys to evict, in eviction order.

    Example:
        >>> plan_evictions(["a", "b", "c"], 2, in_use={"a"})
        ['b']
        >>> plan_evictions(["a", "b", "c"], 3, sizes={"a": 5, "b": 5, "c": 5}, max_bytes=10, pinned={"a"})
        ['b']
    """
    sizes = sizes or {}
    count_excess = len(order) - max(0, capacity)
    byte_excess = sum(sizes.get(key, 0) for key in order) - max_bytes if max_bytes is not None else 0
    victims = []
    for key in order:
        if count_excess <= 0 and byte_excess <= 0:
            break
        if key in in_use or key in pinned:
            continue
        victims.append(key)
        count_excess -= 1
        byte_excess -= sizes.get(key, 0)
    return victims


@dataclass
class AdapterSlot:
    """A loaded adapter: its PEFT name, its expert, its size, and how many running requests hold it."""

    key: AdapterKey
    name: str
    expert_id: str
    in_use: int = 0
    load_seconds: float = 0.0
    nbytes: int = 0
    pinned: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"expert_id": self.expert_id, "repo_id": self.key[0], "revision": self.key[1], "adapter": self.name,
                "in_use": self.in_use, "pinned": self.pinned, "bytes": self.nbytes,
                "load_seconds": round(self.load_seconds, 4)}


class AdapterCache:
    """An LRU of loaded adapters with pinning and a count (and optional byte) budget; eviction is decided
    by :func:`plan_evictions`.

    Not thread-safe on its own: the engine calls it under its lock.

    Args:
        capacity: adapters kept loaded.
        on_evict: called with each evicted :class:`AdapterSlot` (the engine deletes the PEFT adapter).
        max_bytes: the most bytes of adapter weights kept loaded (None: no byte budget).
    """

    def __init__(self, capacity: int, on_evict: Callable[[AdapterSlot], None], *, max_bytes: int | None = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"cache_size must be a positive integer, got {capacity!r}.")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                      or max_bytes < 1):
            raise ValueError(f"cache_bytes must be a positive integer, got {max_bytes!r}.")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._on_evict = on_evict
        self._slots: OrderedDict[AdapterKey, AdapterSlot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def keys(self) -> list[AdapterKey]:
        """Cached keys, least recently used first."""
        return list(self._slots)

    def slots(self) -> list[AdapterSlot]:
        """Cached slots, least recently used first."""
        return list(self._slots.values())

    @property
    def nbytes(self) -> int:
        return sum(slot.nbytes for slot in self._slots.values())

    def has_room(self, nbytes: int = 0) -> bool:
        """True if one more adapter of ``nbytes`` fits without evicting anything."""
        if len(self._slots) >= self.capacity:
            return False
        return self.max_bytes is None or self.nbytes + nbytes <= self.max_bytes

    def get(self, key: AdapterKey) -> AdapterSlot | None:
        """The slot of ``key`` (marked most recently used), or None."""
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
        return slot

    def peek(self, key: AdapterKey) -> AdapterSlot | None:
        """The slot of ``key`` without marking it used, or None."""
        return self._slots.get(key)

    def add(self, slot: AdapterSlot) -> list[AdapterSlot]:
        """Insert ``slot`` as most recently used and evict over budget; return the evicted slots."""
        self._slots[slot.key] = slot
        self._slots.move_to_end(slot.key)
        return self.shrink(keep=slot.key)

    def shrink(self, keep: AdapterKey | None = None) -> list[AdapterSlot]:
        """Evict down to the budget (never ``keep``, a slot in use or a pinned slot); return the evicted."""
        in_use = {key for key, s in self._slots.items() if s.in_use > 0 or key == keep}
        pinned = {key for key, s in self._slots.items() if s.pinned}
        sizes = {key: s.nbytes for key, s in self._slots.items()}
        evicted = []
        for key in plan_evictions(list(self._slots), self.capacity, in_use, sizes=sizes, max_bytes=self.max_bytes,
                                  pinned=pinned):
            victim = self._slots.pop(key)
            self._on_evict(victim)
            evicted.append(victim)
        return evicted
