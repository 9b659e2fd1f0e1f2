"""Training and evaluation of the enrichment model on a Kaggle "Fashion Product Images" style catalogue."""
