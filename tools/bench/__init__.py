"""``inspectd bench``: speed and overhead per scorer, backend and frame size; CurveZMQ's cost."""
