"""Guess which torch optimizer class wrote a state dict, from its state keys and group keys.

A state dict does not record its optimizer class, but every class leaves its fingerprint: the
hyperparameters in ``param_groups`` (``rho`` is Adadelta's, ``etas`` Rprop's, ...) and the
per-parameter state keys (``exp_inf`` is Adamax's, ``acc_delta`` Adadelta's). Both come from
:mod:`optckpt.optim.specs` (torch 2.13's classes, checked against the installed ``torch.optim``).
Older torch versions lack some group keys (``decoupled_weight_decay``, ``fused``,
``differentiable``), which is why the score is a similarity, not an equality test. State keys
are evidence of another kind: a state with a key no ``torch.optim`` class writes (transformers'
own Adafactor keeps ``exp_avg_sq_row`` and ``RMS``) was saved by an optimizer outside
``torch.optim``, and no class is offered for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optckpt.optim.specs import SCHEDULER_GROUP_KEYS, SPECS

# Group keys torch added to many classes over the releases (maximize in 1.11, foreach and
# capturable in 1.12, differentiable in 1.13, fused in 2.0, decoupled_weight_decay in 2.1 to
# 2.6): a group without them may simply be older, so their absence is no evidence.
VERSIONED_GROUP_KEYS = frozenset(
    {"maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"}
)

# Keys that something other than the optimizer puts into groups (LR schedulers, SWA, ...).
_FOREIGN_GROUP_KEYS = frozenset({"params", "param_names", "name"}) | SCHEDULER_GROUP_KEYS

CANDIDATES: tuple[str, ...] = tuple(SPECS)
"""The torch optimizer class names the guesser knows."""


@dataclass(frozen=True)
class Guess:
    """The guessed optimizer class.

    Attributes:
        name: the best class name, or ``None`` when nothing fits.
        confidence: 0 to 1; 1 means the fingerprint matches exactly one class.
        candidates: every class that fits about as well as ``name``, best first.
        reason: a few words on what decided.
    """

    name: str | None
    confidence: float
    candidates: tuple[str, ...]
    reason: str

    @property
    def sure(self) -> bool:
        """Whether the guess is safe to act on without asking the user."""
        return self.name is not None and len(self.candidates) == 1 and self.confidence >= 0.75


def _score(name: str, group_keys: set[str], state_keys: set[str]) -> float:
    # Versioned keys the group lacks are left out of the comparison, so an older torch's
    # group matches its class as well as a current one; keys it has that the class never
    # had still count against the class.
    spec = SPECS[name]
    expected = spec.group_keys - (VERSIONED_GROUP_KEYS - group_keys)
    group_score = len(group_keys & expected) / len(group_keys | expected) if group_keys else 0.0
    required, optional = spec.required_state, spec.optional_state
    if not state_keys:
        state_score = 0.5  # nothing stepped yet: state says nothing
    elif state_keys <= required | optional and required <= state_keys:
        state_score = 1.0
    elif state_keys <= required | optional:
        state_score = 0.6
    else:
        state_score = 0.0
    return 0.6 * group_score + 0.4 * state_score


def _adam_family(groups: list[Mapping[str, Any]]) -> tuple[str, str] | None:
    """Decide Adam against AdamW, which share every key; ``None`` when undecidable."""
    flags = {g.get("decoupled_weight_decay") for g in groups}
    if flags == {True}:
        return "AdamW", "decoupled_weight_decay=True"
    if flags == {False}:
        return "Adam", "decoupled_weight_decay=False"
    return None


def guess_optimizer(state_dict: Mapping[str, Any]) -> Guess:
    """Name the torch optimizer class that most likely produced ``state_dict``.

    Args:
        state_dict: an optimizer state dict (``state`` and ``param_groups``).

    Returns:
        A :class:`Guess`; its ``name`` is ``None``, with no candidates, when the keys fit no
        ``torch.optim`` class (the ``reason`` lists the keys it saw). Checkpoints older than the ``decoupled_weight_decay`` group key
        cannot tell Adam from AdamW; the guess then leans on ``weight_decay`` and says so
        with two candidates.
    """
    groups = list(state_dict.get("param_groups", []))
    group_keys = {str(k) for g in groups for k in g} - _FOREIGN_GROUP_KEYS
    state_keys: set[str] = set()
    for value in state_dict.get("state", {}).values():
        if isinstance(value, Mapping):
            state_keys.update(str(k) for k in value)
    if not group_keys and not state_keys:
        return Guess(None, 0.0, (), "no hyperparameters and no state")
    if state_keys and not any(state_keys <= {k.name for k in s.state} for s in SPECS.values()):
        return Guess(
            None,
            0.0,
            (),
            f"state keys {', '.join(sorted(state_keys))} fit no torch.optim class",
        )

    scores = {name: _score(name, group_keys, state_keys) for name in CANDIDATES}
    ranked = sorted(scores, key=lambda n: -scores[n])
    best = scores[ranked[0]]
    if best < 0.5:
        return Guess(
            None,
            round(best, 2),
            (),
            f"group keys {', '.join(sorted(group_keys))} fit no torch.optim class",
        )
    close = tuple(n for n in ranked if best - scores[n] < 0.05)
    current = tuple(n for n in close if group_keys == SPECS[n].group_keys)
    if current:
        # The group keys of the installed torch's class, exactly: another class that fits as
        # well only does so as an older version of itself (Adamax's keys are an older RAdam's).
        close = current

    if set(close) == {"Adam", "AdamW"}:
        decided = _adam_family(groups)
        if decided is not None:
            return Guess(decided[0], round(best, 2), (decided[0],), decided[1])
        lean = "AdamW" if any(g.get("weight_decay", 0) for g in groups) else "Adam"
        other = "Adam" if lean == "AdamW" else "AdamW"
        return Guess(
            lean, 0.5, (lean, other), "no decoupled_weight_decay key; guessed from weight_decay"
        )
    if len(close) > 1:
        return Guess(close[0], round(best / 2, 2), close, "several optimizers fit equally")
    exact = group_keys == SPECS[close[0]].group_keys
    return Guess(close[0], 1.0 if exact else round(best, 2), close, "group and state keys")
