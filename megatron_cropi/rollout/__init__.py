"""Rollouts: records, engines (vLLM, native Megatron sampler), and the trajectory store."""
