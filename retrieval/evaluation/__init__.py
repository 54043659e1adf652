"""Measuring accuracy: benchmark dataset layouts, their official metrics, and plots."""
