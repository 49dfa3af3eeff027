"""Evaluation metrics: Inception features (pytorch-fid's network and weights), FID, Inception
Score, float64 statistics that all-reduce over ranks."""
