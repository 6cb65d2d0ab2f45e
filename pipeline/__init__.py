"""Small pieces the entry points share: W&B offline handling, atomic checkpoints, config checks, run files."""
