"""Runnable pipelines built on the ``audit`` library (local, demo; Ray and schedules later)."""
