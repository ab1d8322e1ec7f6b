"""Pi0-FAST for FlashRT."""
