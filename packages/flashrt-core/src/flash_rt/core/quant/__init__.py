"""FP8 quantisation helpers and the calibration cache."""
