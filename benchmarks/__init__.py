"""Benchmarks: this project against timm on one card (see README.md here)."""
