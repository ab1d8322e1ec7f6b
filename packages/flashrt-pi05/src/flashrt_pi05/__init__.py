"""Pi0.5 (openpi / lerobot) for FlashRT."""
