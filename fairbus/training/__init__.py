"""Real training: the paper's models, offline data sets, partitions, local SGD and attacks."""
