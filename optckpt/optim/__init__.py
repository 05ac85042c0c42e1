"""optckpt's own reimplementations of the torch optimizers, and the optimizer guesser."""

from optckpt.optim.guess import Guess, guess_optimizer

__all__ = ["Guess", "guess_optimizer"]
