"""Neuron selection for contextual sparsity: pure functions over MLP activations, no device code."""
