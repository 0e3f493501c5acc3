"""Attacks (red-teaming) pointed at any model and defense stack; see base.py for the contract."""
