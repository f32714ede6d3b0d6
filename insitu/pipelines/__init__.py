"""Pretrain, probe and quickstart runs (Lightning modules and the run logic)."""
