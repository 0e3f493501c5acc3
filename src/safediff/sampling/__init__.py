"""Samplers: a pure DDIM step with log-probability, and batched rollouts."""
