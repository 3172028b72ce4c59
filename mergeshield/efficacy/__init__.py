"""Hold-out efficacy bench (issue 12): drawn attacks, every defence, the numbers that are left.

``attacks`` draws seeded attacks, ``world`` plants and measures them on a zoo, ``defences`` and
``baselines`` clean them, ``bench`` runs the cases, ``metrics`` sums them, ``report`` writes
``docs/efficacy/``.
"""
