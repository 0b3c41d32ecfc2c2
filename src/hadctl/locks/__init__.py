"""Lock engines for main slots (flock, later zookeeper); standby slots are always flock."""
