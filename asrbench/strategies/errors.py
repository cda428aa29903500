"""Errors the strategies' cores raise, defined once for every strategy module (this module imports none
of them, so each can import it). The command line turns them into one line
(:func:`asrbench.experiment.non_finite_gradient`)."""
from __future__ import annotations


class NonFiniteGradientError(FloatingPointError):
    """A worker's gradient holds NaN or inf: GTC's residual r, 1-bit SGD's reconstruction values (hence its
    gradient or error feedback).

    `where`: what was not finite, on which rank(s) or worker; `method` (``"GTC"``, ``"1-bit SGD"``) and
    `step` (its hook's own counter, from 0): who met it and when, None where the raiser does not know
    (GTC's codec, whose caller raises again with both). str() is ``"<method> step <step>: <where>"``, or
    `where` alone; what to change is the command line's to say (asrbench.checkpoint.divergence_message,
    with the run's lr)."""

    def __init__(self, where: str, *, method: str | None = None, step: int | None = None) -> None:
        known = method is not None and step is not None
        super().__init__(f"{method} step {step}: {where}" if known else where)
        self.where, self.method, self.step = where, method, step

    @classmethod
    def from_text(cls, text: str) -> NonFiniteGradientError:
        """The error whose str() is `text`: all that is left of one raised in a DDP comm hook's future
        callback, which autograd re-raises as a RuntimeError holding only the text. `method` and `step`
        are read back from the ``"<method> step <step>: "`` that ``__init__`` writes; a text without it
        is `where` alone."""
        head, colon, where = text.partition(": ")
        method, _, step = head.rpartition(" step ")
        if colon and method and step.isdigit():
            return cls(where, method=method, step=int(step))
        return cls(text)
