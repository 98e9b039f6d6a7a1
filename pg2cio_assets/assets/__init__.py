"""The asset graph, one module per stage: extract (source relations into the state database)."""
