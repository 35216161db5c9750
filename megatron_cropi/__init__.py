"""megatron_cropi: CROPI (Curriculum RL with Off-Policy Influence guidance) on Megatron-Core.

Data flow (see DESIGN.md §2): rollouts by a behaviour policy once → per stage, POPI per-prompt
gradients at the current checkpoint, captured shard by shard under TP/PP → sparse random projection
summed over TP then PP → cosine to target-set gradients → top-fraction selection → GRPO on the subset.
"""

__version__ = "0.1.0"
