"""Several coordinator processes as one marketplace: what replicas share and how they meet."""
