"""Reading scans, datalists and landmark files; the demo population."""
