"""POPI: the off-policy policy-gradient loss scored per prompt, its batches, and its capture."""
