"""An engine's arguments made concrete for its model: the defaults that depend on the model
(max_model_len, the step budget without chunked prefill) and the size of the KV pool."""

from __future__ import annotations

import logging
import math
from typing import Protocol

from kvserve.config import DEFAULT_KV_CACHE_MEMORY_BYTES, EngineConfig
from kvserve.kv.sizing import kv_bytes_per_token, kv_dtype_name, num_blocks_for_bytes

logger = logging.getLogger("kvserve")

DEFAULT_MAX_MODEL_LEN = 4096


class ModelDims(Protocol):
    """What sizing reads of the model's config (`ModelConfig` has it)."""

    @property
    def max_position_embeddings(self) -> int: ...
    @property
    def num_hidden_layers(self) -> int: ...
    @property
    def num_key_value_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...


def resolve_config(config: EngineConfig, model: ModelDims) -> tuple[EngineConfig, int]:
    """Fill the model-dependent defaults (max_model_len, the step budget without chunked
    prefill) and size the KV pool.

    Raises:
        ValueError: max_model_len beyond the model's, or a pool too small for one request.
    """
    model_max = model.max_position_embeddings
    max_model_len = config.max_model_len or min(model_max, DEFAULT_MAX_MODEL_LEN)
    if max_model_len > model_max:
        raise ValueError(f"max_model_len: {max_model_len} exceeds the model's maximum {model_max}")
    num_batched = config.max_num_batched_tokens
    if config.cache_mode == "none" or not config.enable_chunked_prefill:
        num_batched = max(num_batched, max_model_len)  # whole sequences must fit one step
    config = config.replace(max_model_len=max_model_len, max_num_batched_tokens=num_batched)
    num_blocks = num_kv_blocks(config, model)
    return config, num_blocks


def num_kv_blocks(config: EngineConfig, model: ModelDims) -> int:
    """Blocks of the KV pool: `num_kv_blocks`, else the byte budget over the bytes a
    token takes (kv/sizing.py, scales included); 0 without a cache.

    Raises:
        ValueError: the pool cannot hold one request of `max_model_len`.
    """
    if config.cache_mode == "none":
        logger.info("KV cache: none (every step recomputes the whole sequence)")
        return 0
    kv_dtype = kv_dtype_name(config.kv_cache_dtype, config.dtype)
    per_token = kv_bytes_per_token(
        model.num_hidden_layers, model.num_key_value_heads, model.head_dim, kv_dtype,
        config.block_size,
    )  # fmt: skip
    if config.num_kv_blocks is not None:
        num_blocks, field_name = config.num_kv_blocks, "num_kv_blocks"
    else:
        budget = config.kv_cache_memory_bytes or DEFAULT_KV_CACHE_MEMORY_BYTES
        num_blocks = num_blocks_for_bytes(budget, config.block_size, per_token.total)
        field_name = "kv_cache_memory_bytes"
    assert config.max_model_len is not None
    needed = math.ceil(config.max_model_len / config.block_size) + 1
    if num_blocks < needed:
        raise ValueError(
            f"{field_name}: the KV pool holds {num_blocks} blocks of {config.block_size} "
            f"tokens, fewer than the {needed} one request of max_model_len "
            f"{config.max_model_len} may need; give more memory or lower max_model_len"
        )
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%d bytes/token: %d K/V "
        "in %s + %d scales)",
        num_blocks, config.block_size, num_blocks * config.block_size,
        num_blocks * config.block_size * per_token.total / 2**20, per_token.total,
        per_token.data, kv_dtype, per_token.scales,
    )  # fmt: skip
    return num_blocks
