"""``inspectd synth``: synthetic 3D anomaly-detection datasets in the public layouts."""
