"""The policy model: config and presets, the GPTModel provider, global parameter identity."""
