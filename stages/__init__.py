"""Thin entry modules, one per DVC stage: read params and inputs, call pipeline/, write outputs."""
