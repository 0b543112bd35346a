"""T-Core: `defense` (the four components as stages of a run, `defend`, `check`), `sift` (seed sifting),
`confusion` (seed expansion by confusion training), `channels` (UCLC channel filtering), `bootstrap`
(progressive bootstrapping)."""

from jaxpurify.defenses.tcore.defense import COMPONENTS, check, defend
from jaxpurify.errors import moved

__all__ = ["COMPONENTS", "check", "defend"]
__getattr__ = moved(__name__, {
    "admit": "jaxpurify.defenses.tcore.bootstrap.admit", "seeds_stage": "jaxpurify.defenses.tcore.sift.seeds_stage",
    "expand": "jaxpurify.defenses.tcore.confusion.expand", "confusion_round": "jaxpurify.defenses.tcore.confusion",
    "filter_stage": "jaxpurify.defenses.tcore.channels.filter_stage",
    "poison_counts": "jaxpurify.evaluation.metrics.poison_counts",
    "detection": "jaxpurify.evaluation.metrics.detection", "tcore": "jaxpurify.experiments.tcore.run"})
