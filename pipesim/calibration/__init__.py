"""Calibration: fit the simulator's cost model to executor measurements, and measure the simulator's error."""
