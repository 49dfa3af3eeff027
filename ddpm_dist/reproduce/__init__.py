"""Reproducing the paper's table: datasets (recipes and the paper's numbers), plan (a run's
settings and files), prepare (raw data → shards, statistics), chain (the Slurm stages), report."""
