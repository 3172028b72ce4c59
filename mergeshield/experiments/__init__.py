"""Reproductions of the paper's experiments (arXiv:2510.08016) at small scale, on the zoo.

One module per experiment computes results (no files, no printing); ``runner.py`` writes the
Markdown tables, PNG plots and ``results.json`` that ``mergeshield bench paper`` produces.
"""
