"""Llama-family decoder math: plain torch functions over explicit weight tensors."""
