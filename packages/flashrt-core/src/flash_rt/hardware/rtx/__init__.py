"""RTX-family (SM80/86/87/89/120) attention backends: hardware primitives only, framework-neutral."""
