"""Adversarial prompt tuning of CLIP (CAPT, TAPT and peers) with a distributed search pipeline.

The core (config, clip, prompts, attacks, losses, train, evaluate, tapt) imports neither ray nor
mlflow; ``search`` and ``tracking`` adapt it at the edge.
"""

__version__ = "0.1.0"
