"""The model layer: tensor code, imported only by the model runner.

    config.py     ModelConfig, from an HF config dict (pure Python, no torch)
    attention/    AttentionMetadata, planning, backends (SDPA, fused, C++), the attention op
    layers.py     CausalLM contract, fused linears, RMSNorm, RoPE
    llama.py      Llama, Mistral, Qwen2          gpt2.py  GPT-2
    registry.py   architecture name -> class     loader.py  load_model(path, dtype, device)

This package file imports nothing, so `kvserve.model.config` stays importable without torch.
"""
