"""KV moved between the block pool and somewhere else (a tier, another engine), as orders.

The KV cache manager decides; the orders travel in the scheduler's output; the model runner's
connector (kv/kv_connector.py) moves the bytes:

    schedule:  prefix hit in the pool, then the hash chain continued outside it
               -> blocks_to_load:  fresh blocks to fill before the forward
               newly written full blocks (only when the connector saves)
               -> blocks_to_save:  blocks to copy out after the forward
               a preempted request's full blocks the connector lacks (swap preemption)
               -> blocks_to_swap_out:  blocks to copy out before the forward
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol


class BlockTransfer(NamedTuple):
    """One block to load into or save from the pool, and the prefix hash that names it."""

    block_id: int
    block_hash: bytes


class ExternalBlocks(Protocol):
    """The scheduler half of a KV connector, as the KV cache manager sees it."""

    @property
    def saves_blocks(self) -> bool:
        """True when newly written full blocks should be listed in `blocks_to_save`."""
        ...

    def num_external_hit_blocks(self, block_hashes: Sequence[bytes]) -> int:
        """How many leading blocks of `block_hashes` (a hash chain) can be loaded."""
        ...

    def get_hit_tiers(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        """Blocks per place (tier name) of a run `num_external_hit_blocks` just counted."""

    def num_held_blocks(self, block_hashes: Sequence[bytes]) -> int:
        """How many leading blocks of `block_hashes` are held now (reads nothing)."""
        ...

    def prepare_loads(self, blocks: Sequence[BlockTransfer]) -> None:
        """The step's loads, decided (once per schedule, possibly empty): what the lookups
        of this schedule found beyond them will not be loaded."""
        ...
