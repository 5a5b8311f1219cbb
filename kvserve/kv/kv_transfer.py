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

from kvserve.kv.block import KVBlock
from kvserve.request import Request


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


def blocks_to_swap_out(
    table: Sequence[KVBlock], request: Request, block_size: int, connector: ExternalBlocks
) -> list[BlockTransfer]:
    """A preempted request's computed full blocks the connector does not hold yet.

    Swap preemption saves these before freeing them; the partial last block is left out
    (it has no hash: it is recomputed on resume). The connector's leading run is skipped:

        table     [ b0 b1 b2 b3 | b4 (partial) ]    num_computed_tokens // block_size = 4
        held         b0 b1                          -> save (b2, h2), (b3, h3)
    """
    hashes = request.block_hashes
    num_full = min(len(table), len(hashes), request.num_computed_tokens // block_size)
    if num_full == 0:
        return []
    num_held = connector.num_held_blocks(hashes[:num_full])
    return [BlockTransfer(table[i].block_id, hashes[i]) for i in range(num_held, num_full)]
