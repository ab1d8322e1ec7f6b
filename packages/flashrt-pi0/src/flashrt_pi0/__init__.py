"""Pi0 (openpi / lerobot) for FlashRT."""
