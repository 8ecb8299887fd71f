"""Object discovery: on-device k-means and mask mapping (Odin, R2O)."""
