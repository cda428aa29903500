"""What one config key accepts (:class:`Knob`): the train schema's entries (asrbench/config.py) and
each strategy's own (its spec's ``knobs``, asrbench/strategies/)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Knob:
    """What one key accepts: a type (int, float, bool, str), an optional range and choices."""

    kind: type
    low: float | None = None     # inclusive unless low_open
    high: float | None = None    # inclusive unless high_open
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    steps_or_fraction: bool = False  # Lightning's val_check_interval: a fraction (0, 1] or a step count >= 1

    def allowed(self) -> str:
        """What is allowed, in words (the second half of an error message)."""
        if self.choices:
            text = " | ".join(map(str, self.choices))
        elif self.steps_or_fraction:
            text = "a fraction of an epoch in (0, 1] or a whole number of steps >= 1"
        else:
            name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.kind]
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.low_open else '>='} {_num(self.low)}")
            if self.high is not None:
                bounds.append(f"{'<' if self.high_open else '<='} {_num(self.high)}")
            text = name + (" " + " and ".join(bounds) if bounds else "")
        return text + (", or null" if self.nullable else "")

    def problem(self, value: Any) -> bool:
        """True when `value` is not allowed."""
        if value is None:
            return not self.nullable
        if self.steps_or_fraction:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return True
            return not (0 < value <= 1) and not (float(value).is_integer() and value >= 1)
        if self.kind is bool:
            return not isinstance(value, bool)
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return True
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return True
        elif self.kind is str and not isinstance(value, str):
            return True
        if self.choices is not None and value not in self.choices:
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return True
        return self.high is not None and (value >= self.high if self.high_open else value > self.high)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"
