"""verify_cluster and repair_cluster between real nodes (real LMDB, mutual TLS)."""
