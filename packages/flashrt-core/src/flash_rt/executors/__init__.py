"""Declarative weight loading: specs (weight_loader), torch transforms/sinks (torch_weights),
jax transforms/sinks (jax_weights)."""
