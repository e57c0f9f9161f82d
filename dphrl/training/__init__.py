"""The training loop: the trainer's step, the run around it, the optimizer, the data position,
checkpoints, held-out evals, LoRA and the weight sync to the rollout engine."""
