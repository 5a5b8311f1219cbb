"""What a replay costs and counts: the prefill/decode cost model and one run's result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CostModel:
    """How long a request holds its blocks: prefill of its uncached tokens, then decode.

    Args:
        prefill_tokens_per_s: prefill throughput of the model being sized (measure it).
        decode_ms_per_token: time per output token (TPOT).
        kv_bytes_per_token: K/V bytes of one token (`kvserve kv-size`), for tier transfers.
    """

    prefill_tokens_per_s: float = 10_000.0
    decode_ms_per_token: float = 30.0
    kv_bytes_per_token: int = 131_072  # Llama-3-8B in fp16: 2 x 32 x 8 x 128 x 2

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "kv_bytes_per_token"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not self.decode_ms_per_token >= 0:
            raise ValueError(f"decode_ms_per_token: must be >= 0, got {self.decode_ms_per_token}")

    def prefill_s(self, num_tokens: int) -> float:
        return num_tokens / self.prefill_tokens_per_s

    def decode_s(self, num_tokens: int) -> float:
        return num_tokens * self.decode_ms_per_token / 1000.0


@dataclass
class SimResult:
    """Counters of one replay (one policy at one capacity)."""

    policy: str
    capacity_blocks: int
    num_requests: int = 0
    num_rejected: int = 0
    prompt_blocks: int = 0
    hit_blocks: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0
    peak_used_blocks: int = 0
    queue_wait_s: list[float] = field(default_factory=list)
    tier_hit_blocks: dict[str, int] = field(default_factory=dict)
    tier_hit_tokens: dict[str, int] = field(default_factory=dict)
    tier_saved_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self, cost: CostModel) -> dict[str, Any]:
        waits = sorted(self.queue_wait_s)
        restored_tokens = sum(self.tier_hit_tokens.values())
        recompute_s = cost.prefill_s(self.prompt_tokens)
        device_saved_s = cost.prefill_s(self.hit_tokens)
        saved_s = device_saved_s + sum(self.tier_saved_s.values())
        return {
            "policy": self.policy,
            "capacity_blocks": self.capacity_blocks,
            "num_requests": self.num_requests,
            "num_rejected": self.num_rejected,
            "prompt_blocks": self.prompt_blocks,
            "hit_blocks": self.hit_blocks,
            "block_hit_ratio": _ratio(self.hit_blocks, self.prompt_blocks),
            "prompt_tokens": self.prompt_tokens,
            "token_hit_ratio": _ratio(self.hit_tokens, self.prompt_tokens),
            "restored_tokens": restored_tokens,
            "prefill_tokens_saved": self.hit_tokens + restored_tokens,
            "evictions": self.evictions,
            "peak_used_blocks": self.peak_used_blocks,
            "mean_queue_wait_s": sum(waits) / len(waits) if waits else 0.0,
            "max_queue_wait_s": waits[-1] if waits else 0.0,
            "prefill_s_without_cache": recompute_s,
            "prefill_s_saved": saved_s,
            "prefill_saved_fraction": _ratio(saved_s, recompute_s),
            "tiers": {
                name: {
                    "hit_blocks": self.tier_hit_blocks[name],
                    "hit_tokens": self.tier_hit_tokens[name],
                    "prefill_s_saved": self.tier_saved_s[name],
                }
                for name in self.tier_hit_blocks
            },
        }


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0
