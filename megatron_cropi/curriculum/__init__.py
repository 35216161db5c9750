"""The CROPI stage controller and what it needs: state, steps, warm-up, evaluation, probe, reports (docs/design.md)."""
