"""Training stages: RL (rl), synthesis (synthesis), diffusion (diffusion)."""
