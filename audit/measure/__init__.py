"""Measure: the compiled per-batch step, the region metrics it computes (their
specifications in ``spec``), the host-side localisation metric and the row schema."""
