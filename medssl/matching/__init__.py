"""One-shot landmark detection: embedding matching (CC2D/SAM), classical baselines (NCC, atlas registration),
template ranking and figures; ``run.py`` holds the file-level entry points the CLI calls."""
