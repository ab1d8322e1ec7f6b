"""GR00T N1.6 / N1.7 for FlashRT."""
