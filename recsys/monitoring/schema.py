"""What a check reports per platform: each signal beside its threshold (:class:`DriftReport`),
and the samples its figures draw. Plain data: ``recsys.monitoring.monitor`` fills them,
``recsys.monitoring.report`` writes them, a trigger reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True)
class Signal:
    """One signal of a platform: its value beside its threshold."""

    name: str
    value: float | None
    """None: not computable (no feedback, no champion, an empty window)."""
    threshold: float | None
    """None: reported, not judged."""
    breached: bool
    breach_when: Literal["above", "below"] = "above"
    detail: str = ""


@dataclass
class Samples:
    """What the report's figures draw (not serialised)."""

    labels: list[str] = field(default_factory=list)
    reference_counts: np.ndarray = field(default_factory=lambda: np.zeros(0))
    current_counts: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reference_history: np.ndarray = field(default_factory=lambda: np.zeros(0))
    current_history: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reference_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    current_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass
class DriftReport:
    """One platform's check."""

    platform: str
    checked_at: datetime
    champion: str | None
    """The champion's registry version (``local``: an export from the config; None: none)."""
    cutoff: datetime | None
    cutoff_source: str
    """``champion`` | ``config`` | ``newest_events`` (see ``recsys.monitoring.windows``)."""
    reference_events: int
    new_events: int
    """Interactions after the cutoff."""
    current_events: int
    """Interactions judged (the newest, at most ``window.current_events``)."""
    judged: bool
    """False: too few new interactions to judge the data signals."""
    signals: list[Signal]
    notes: list[str] = field(default_factory=list)
    report_dir: str | None = None
    """Where ``check`` wrote the report (shared by the platforms of one check)."""
    mlflow_run_id: str | None = None
    samples: Samples = field(default_factory=Samples, repr=False)

    @property
    def drifted(self) -> bool:
        return any(s.breached for s in self.signals)

    @property
    def reasons(self) -> list[str]:
        return [f"{s.name} {s.value:.4f} {'>' if s.breach_when == 'above' else '<'} "
                f"{s.threshold:.4f}" for s in self.signals if s.breached]

    def signal(self, name: str) -> Signal:
        return next(s for s in self.signals if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"platform": self.platform, "checked_at": self.checked_at.isoformat(),
                "champion": self.champion,
                "cutoff": self.cutoff.isoformat() if self.cutoff else None,
                "cutoff_source": self.cutoff_source, "reference_events": self.reference_events,
                "new_events": self.new_events, "current_events": self.current_events,
                "judged": self.judged, "drifted": self.drifted, "reasons": self.reasons,
                "notes": self.notes, "report_dir": self.report_dir,
                "mlflow_run_id": self.mlflow_run_id,
                "signals": [{"name": s.name, "value": s.value, "threshold": s.threshold,
                             "breached": s.breached, "breach_when": s.breach_when,
                             "detail": s.detail} for s in self.signals]}
