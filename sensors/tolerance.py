"""Part-to-part variation of a manufactured part: ISO 2768-1 general tolerances.

Why: a synthetic benchmark must make good parts differ the way good parts off one line do. A
drawing without a tolerance on a dimension means its general tolerance, most often ISO 2768-1
class m; a deviation larger than that is out of tolerance, i.e. a defect. ``sensors.parts``
jitters each nominal dimension within the band this module gives (docs/results/bench-preset.md,
"Part-to-part variation").
"""

from __future__ import annotations

import numpy as np

ISO_2768_SIZES_MM: tuple[float, ...] = (3.0, 6.0, 30.0, 120.0, 400.0, 1000.0, 2000.0)
"""Upper ends of ISO 2768-1's size ranges for linear dimensions (the first starts at 0.5 mm)."""
ISO_2768_MM: dict[str, tuple[float, ...]] = {
    "f": (0.05, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5),
    "m": (0.1, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2),
    "c": (0.2, 0.3, 0.5, 0.8, 1.2, 2.0, 3.0),
    "v": (0.5, 0.5, 1.0, 1.5, 2.5, 4.0, 6.0),
}
"""ISO 2768-1 permissible deviations (± mm) per tolerance class and size range (class v has none
below 3 mm; its 3-6 mm value is used there)."""
DEFAULT_TOLERANCE = "m"

Tolerance = str | float
"""An ISO 2768-1 class letter (``"f"``, ``"m"``, ``"c"``, ``"v"``) or a relative jitter (0.02: ±2 %)."""


def permissible_deviation(nominal_mm: float, tolerance: Tolerance) -> float:
    """Half-width (mm) of the band a dimension of ``nominal_mm`` may vary in under ``tolerance``."""
    if isinstance(tolerance, str):
        if tolerance not in ISO_2768_MM:
            raise ValueError(f"unknown ISO 2768 tolerance class {tolerance!r}; known: {', '.join(ISO_2768_MM)}")
        band = min(int(np.searchsorted(ISO_2768_SIZES_MM, abs(nominal_mm))), len(ISO_2768_SIZES_MM) - 1)
        return ISO_2768_MM[tolerance][band]
    if not 0.0 <= float(tolerance) < 1.0:
        raise ValueError(f"a relative tolerance must lie in [0, 1), got {tolerance}")
    return abs(float(nominal_mm)) * float(tolerance)
