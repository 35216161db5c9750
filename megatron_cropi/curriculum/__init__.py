"""The CROPI stage controller (DESIGN.md §2) and what it needs: warm-up, evaluation, reports, state."""
