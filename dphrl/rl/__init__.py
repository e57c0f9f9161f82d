"""The RL maths: pure functions of tensors (advantages, policy losses, divergences, filters,
aggregation, the hybrid objective, log-probs and the packed layout they run on)."""
