"""A neighbour module: shipped with the script because it lives in the script's directory."""

SAMPLES = [1.0, 2.0, 3.0, 4.0, 5.0]
