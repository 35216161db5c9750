"""megatron_cropi: CROPI (Curriculum RL with Off-Policy Influence guidance) on Megatron-Core.

Data flow (see docs/design.md §3): rollouts by a behaviour policy once → per stage, POPI per-prompt
gradients at the current checkpoint, captured shard by shard under TP/PP → sparse random projection
summed over TP then PP → cosine to target-set gradients → top-fraction selection → GRPO on the subset.
"""

import warnings as _warnings

__version__ = "0.1.0"

# megatron-core announces on every import that the CPU/no-Apex fallbacks are in use; they are expected.
_warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
_warnings.filterwarnings("ignore", message="Apex is not installed")
