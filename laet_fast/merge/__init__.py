"""SPEAR-MM: measure how fine-tuning changed each block, then pull chosen blocks back toward the base.

``layer_impact(base, tuned)`` scores each block from two checkpoints streamed block by block;
``restore(base, tuned, out=..., policy=... | t=...)`` writes the merged checkpoint tensor by tensor.
"""
from laet_fast.merge.impact import layer_impact
from laet_fast.merge.restore import POLICIES, policy_t, restore

__all__ = ["layer_impact", "restore", "policy_t", "POLICIES"]
