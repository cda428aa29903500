"""Errors the strategies' cores raise, defined once for every strategy module (this module imports none
of them, so each can import it). The command line turns them into one line
(:func:`asrbench.experiment.non_finite_gradient`)."""
from __future__ import annotations


class NonFiniteGradientError(FloatingPointError):
    """A worker's gradient holds NaN or inf: GTC's residual r, 1-bit SGD's reconstruction values (hence its
    gradient or error feedback). str() names the strategy, its step and the rank(s) or worker; what to
    change is the command line's to say (asrbench.checkpoint.divergence_message, with the run's lr)."""
