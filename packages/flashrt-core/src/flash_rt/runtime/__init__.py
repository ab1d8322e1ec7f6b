"""Runtime scheduling utilities (RTC-lite)."""
