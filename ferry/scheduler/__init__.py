"""Decoding: the KV cache, sampling, and the loop that turns forward passes into tokens."""
