"""Rewards: one signature, one file per reward. See `safediff.rewards.base`."""
