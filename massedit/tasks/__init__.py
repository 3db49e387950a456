"""Jobs: edit, evaluate, train, stats, sweep (the layer above Lightning; below the CLI)."""
