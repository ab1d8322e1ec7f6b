"""Video world models (Wan2.2 TI2V-5B, Cosmos3-Nano, Motus) for FlashRT."""
