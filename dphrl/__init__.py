"""dphrl: diversity-preserving hybrid RL (DPH-RL, arXiv 2509.07430) for LLMs."""

__version__ = "0.1.0"
