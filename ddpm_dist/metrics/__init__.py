"""Evaluation metrics: Inception features, FID, Inception Score (DESIGN §3)."""
