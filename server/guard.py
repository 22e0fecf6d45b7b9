"""Guard policy: which mode and threshold apply to a request, and what a score decides.

Pure functions over plain values, so the policy is testable without a model. A request may
ask for a *stricter* guard than the server's (more features, lower threshold) unless the
server allows overrides; it can never silently weaken the server's policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

GuardMode = Literal["off", "flag", "block", "patch", "block+patch"]
Stage = Literal["prefill", "stream"]
Decision = Literal["allow", "block", "flag"]

GUARD_MODES: tuple[GuardMode, ...] = get_args(GuardMode)
# What each mode does: score (report), block (stop on a flag), patch (live activation patching).
_FEATURES: dict[GuardMode, frozenset[str]] = {
    "off": frozenset(),
    "flag": frozenset({"score"}),
    "block": frozenset({"score", "block"}),
    "patch": frozenset({"score", "patch"}),
    "block+patch": frozenset({"score", "block", "patch"}),
}


class PolicyError(ValueError):
    """A request asked for a guard weaker than the server allows; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GuardPolicy:
    """The guard one request runs under."""

    mode: GuardMode
    prefill_threshold: float
    stream_threshold: float

    @property
    def scores(self) -> bool:
        return "score" in _FEATURES[self.mode]

    @property
    def blocks(self) -> bool:
        return "block" in _FEATURES[self.mode]

    @property
    def patches(self) -> bool:
        return "patch" in _FEATURES[self.mode]

    def decide(self, score: float, stage: Stage) -> Decision:
        threshold = self.prefill_threshold if stage == "prefill" else self.stream_threshold
        if score < threshold:
            return "allow"
        return "block" if self.blocks else "flag"


def is_stricter_or_equal(requested: GuardMode, server: GuardMode) -> bool:
    """A mode is at least as strict when it keeps every feature of the server's mode."""
    return _FEATURES[requested] >= _FEATURES[server]


def resolve_policy(
    server: GuardPolicy,
    requested_mode: GuardMode | None,
    requested_threshold: float | None,
    *,
    allow_override: bool,
) -> GuardPolicy:
    """Merge a request's `guard` object into the server policy, refusing weaker guards."""
    mode = requested_mode or server.mode
    if not allow_override and not is_stricter_or_equal(mode, server.mode):
        raise PolicyError(
            f"guard mode '{mode}' is weaker than the server policy '{server.mode}' (overrides are disabled)", "guard.mode"
        )
    if requested_threshold is None:
        return GuardPolicy(mode, server.prefill_threshold, server.stream_threshold)
    if allow_override:
        return GuardPolicy(mode, requested_threshold, requested_threshold)
    if requested_threshold > server.prefill_threshold:
        raise PolicyError(
            f"guard threshold {requested_threshold} is above the server threshold {server.prefill_threshold:.4g} "
            "(a request may only lower it; overrides are disabled)",
            "guard.threshold",
        )
    return GuardPolicy(mode, requested_threshold, min(requested_threshold, server.stream_threshold))
