"""Helpers for tests and benchmarks: multi-process gloo launches and tiny models/data.

Shipped in the package (not under tests/) because benchmarks and users' own tests use them too.
"""
