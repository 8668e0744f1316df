"""Compatibility re-exports: each plugin now lives in its own module (``scorers/filter``,
``scorers/scorer``, ``scorers/picker``) and the type registry in ``scorers.registry``."""

from __future__ import annotations

from scorers.filter.healthy import HealthyFilter
from scorers.filter.model import ModelFilter
from scorers.filter.prefix_affinity import PrefixAffinityFilter
from scorers.filter.role import RoleFilter
from scorers.picker.max import MaxPicker
from scorers.picker.random import RandomPicker
from scorers.picker.round_robin import RoundRobinPicker
from scorers.picker.weighted_random import WeightedRandomPicker
from scorers.registry import BUILTINS, REGISTRY, register
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

__all__ = [
    "BUILTINS",
    "REGISTRY",
    "ApproxPrefixScorer",
    "ApproxTreeScorer",
    "EstimatedTTFTScorer",
    "HealthyFilter",
    "InflightScorer",
    "KVUsageScorer",
    "LeastLoadedScorer",
    "MaxPicker",
    "ModelFilter",
    "PlacementScorer",
    "PrecisePrefixScorer",
    "PrefixAffinityFilter",
    "QueueScorer",
    "RandomPicker",
    "RoleFilter",
    "RoundRobinPicker",
    "SessionScorer",
    "TokenLoadScorer",
    "WeightedRandomPicker",
    "register",
]
