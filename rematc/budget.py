"""Parse the ``budget`` argument: bytes, a size string, or a fraction of the no-remat peak."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30,
}
ACCEPTED_FORMS = (
    "an int number of bytes (e.g. 536870912), a size string such as '512MiB', "
    "'3GB' or '1.5GiB' (B, KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers "
    "of 1024), or a float in (0, 1] meaning that fraction of the no-remat peak"
)


@dataclass(frozen=True, slots=True)
class Budget:
    """A parsed budget: exactly one of ``bytes`` and ``fraction`` is set."""

    bytes: int | None = None
    fraction: float | None = None
    given: str = ""

    def resolve(self, no_remat_peak_bytes: int) -> int:
        """The budget in bytes, given the no-remat peak for fractions."""
        if self.bytes is not None:
            return self.bytes
        assert self.fraction is not None
        return int(math.floor(self.fraction * no_remat_peak_bytes))


def parse_budget(budget: object) -> Budget:
    """Parse ``budget``; raise ``ValueError`` naming the accepted forms.

    Example:
        >>> parse_budget("1.5GiB").bytes
        1610612736
        >>> parse_budget(0.4).fraction
        0.4
    """
    if isinstance(budget, bool):
        raise ValueError(f"budget must be {ACCEPTED_FORMS}; got the bool {budget!r}")
    if isinstance(budget, int):
        if budget < 0:
            raise ValueError(f"budget must be {ACCEPTED_FORMS}; got the negative int {budget}")
        return Budget(bytes=budget, given=str(budget))
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            raise ValueError(
                f"budget must be {ACCEPTED_FORMS}; got the float {budget!r}, outside (0, 1] "
                "(for bytes pass an int or a string such as '2GiB')"
            )
        return Budget(fraction=budget, given=repr(budget))
    if isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", budget)
        if match:
            number, unit = float(match.group(1)), match.group(2).lower()
            if unit in _UNITS:
                return Budget(bytes=int(number * _UNITS[unit]), given=budget)
        raise ValueError(f"budget must be {ACCEPTED_FORMS}; could not parse the string {budget!r}")
    raise ValueError(f"budget must be {ACCEPTED_FORMS}; got {type(budget).__name__} {budget!r}")
