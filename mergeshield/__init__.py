"""MergeShield: find and remove merge-surviving backdoors in fine-tuned checkpoints.

Implements Pawlak et al., "Backdoor Vectors: a Task Arithmetic View on Backdoor Attacks and
Defenses" (arXiv:2510.08016): task vectors, backdoor vectors (BV), sparse BVs (SBV) and Injection
BV Subtraction (IBVS).
"""

__version__ = "0.1.0"
