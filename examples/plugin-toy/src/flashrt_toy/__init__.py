"""flashrt-plugin-toy: the smallest complete FlashRT model plugin (see docs/plugins.md)."""
