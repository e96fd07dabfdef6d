"""Benchmarks: each prints a table and writes JSON (with device, date and command).

Committed results live in ``benchmarks/results/``; ``scripts/render_docs.py`` renders the
tables in the docs from them.
"""
