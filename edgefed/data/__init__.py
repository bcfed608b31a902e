"""Where training and evaluation data come from: the synthetic task, text sources, shards."""
