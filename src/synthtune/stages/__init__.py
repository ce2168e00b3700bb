"""One module per stage: `<Stage>Config`, `key(cfg, upstream)` and `run(cfg, store, upstream) -> ArtifactRef`."""
