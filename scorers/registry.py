"""YAML ``type`` name → plugin class, for every built-in filter, scorer and picker.

Filled from the explicit ``BUILTINS`` list below (no discovery, no registration as a side
effect of importing a plugin module): a new plugin is one module under ``scorers/filter``,
``scorers/scorer`` or ``scorers/picker`` plus one line here.
"""

from __future__ import annotations

from scorers.base import Filter, Picker, Plugin, Scorer
from scorers.filter.healthy import HealthyFilter
from scorers.filter.model import ModelFilter
from scorers.filter.prefix_affinity import PrefixAffinityFilter
from scorers.filter.role import RoleFilter
from scorers.picker.max import MaxPicker
from scorers.picker.random import RandomPicker
from scorers.picker.round_robin import RoundRobinPicker
from scorers.picker.weighted_random import WeightedRandomPicker
from scorers.scorer.approx_prefix import ApproxPrefixScorer
from scorers.scorer.approx_tree import ApproxTreeScorer
from scorers.scorer.estimated_ttft import EstimatedTTFTScorer
from scorers.scorer.inflight import InflightScorer
from scorers.scorer.kv_usage import KVUsageScorer
from scorers.scorer.least_loaded import LeastLoadedScorer
from scorers.scorer.placement import PlacementScorer
from scorers.scorer.precise_prefix import PrecisePrefixScorer
from scorers.scorer.queue import QueueScorer
from scorers.scorer.session import SessionScorer
from scorers.scorer.token_load import TokenLoadScorer

BUILTINS: tuple[type[Plugin], ...] = (
    # filters
    HealthyFilter,
    RoleFilter,
    ModelFilter,
    PrefixAffinityFilter,
    # scorers
    PrecisePrefixScorer,
    ApproxPrefixScorer,
    ApproxTreeScorer,
    InflightScorer,
    QueueScorer,
    KVUsageScorer,
    LeastLoadedScorer,
    TokenLoadScorer,
    EstimatedTTFTScorer,
    SessionScorer,
    PlacementScorer,
    # pickers
    MaxPicker,
    WeightedRandomPicker,
    RoundRobinPicker,
    RandomPicker,
)

REGISTRY: dict[str, type[Plugin]] = {}


def register(cls: type[Plugin]) -> type[Plugin]:
    """Add a plugin class under its ``type_name`` (a filter, scorer or picker; names are unique)."""
    if not cls.type_name:
        raise ValueError(f"{cls.__name__}: type_name is empty")
    if not issubclass(cls, (Filter, Scorer, Picker)):
        raise ValueError(f"{cls.__name__}: not a Filter, Scorer or Picker")
    if REGISTRY.get(cls.type_name, cls) is not cls:
        raise ValueError(f"{cls.__name__}: type {cls.type_name!r} is already {REGISTRY[cls.type_name].__name__}")
    REGISTRY[cls.type_name] = cls
    return cls


for _cls in BUILTINS:
    register(_cls)
