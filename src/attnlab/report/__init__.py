"""attnlab report: comparisons of mechanisms built from benchmark and training results."""
