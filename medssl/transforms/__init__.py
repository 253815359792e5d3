"""Scan preprocessing (``Preprocessing``), the prepared-data cache (``PreparedScans``), information maps, intensity augmentation, and the view
sampler that renders pairs of views with known correspondence for the objectives."""
