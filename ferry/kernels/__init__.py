"""Compute kernels. `reference` holds the plain-torch ops every faster kernel is tested against."""
