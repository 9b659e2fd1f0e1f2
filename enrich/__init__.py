"""The `enrich` command line: the composition root that wires schema, ingest, worker and training."""
