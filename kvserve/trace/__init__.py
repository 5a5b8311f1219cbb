"""Request traces (Mooncake's JSONL format): reading, replay workloads, analysis."""
