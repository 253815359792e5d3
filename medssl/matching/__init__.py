"""One-shot landmark detection and label propagation from one labeled template: embedding matching (CC2D/SAM),
label propagation (``propagate.py``), classical baselines (NCC, atlas registration), template ranking and figures;
``run.py`` and ``propagate.py`` hold the file-level entry points the CLI calls."""
