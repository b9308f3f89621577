"""The grid of cascade configurations a load test sweeps: per-stage choices of variant, samples and keep,
written `a,b/c` (stages separated by `/`, choices by `,`), expanded as a Cartesian product."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

__all__ = ["StageSpec", "parse_groups", "expand_grid", "cascade_label", "stages_payload"]


@dataclass(frozen=True)
class StageSpec:
    """One stage as sent in a query's `stages` list (mirrors cascade.config.Stage, without importing torch)."""

    variant: str
    samples: int
    keep: int | None = None
    aggregator: str = "bayes"


def parse_groups(text: str) -> list[list[str]]:
    """`"a,b/c"` -> `[["a", "b"], ["c"]]`; empty choices are an error, not silently dropped."""
    groups = [[c.strip() for c in g.split(",")] for g in text.split("/")]
    if any(not c for g in groups for c in g):
        raise ValueError(f"empty choice in grid option {text!r}")
    return groups


def _per_stage(groups: list[list[str]], stages: int, name: str) -> list[list[str]]:
    if len(groups) == 1:
        return groups * stages  # one group applies to every stage
    if len(groups) != stages:
        raise ValueError(f"--{name} has {len(groups)} stage groups but --variants has {stages}")
    return groups


def _int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--{name}: {text!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"--{name}: must be >= 1, got {value}")
    return value


def expand_grid(
    variants: str, samples: str, keep: str, aggregators: str, k: int, max_configs: int
) -> tuple[list[tuple[StageSpec, ...]], list[str]]:
    """All cascades of the grid, and the reasons for the combinations dropped.

    A combination is dropped when a non-last stage keeps fewer than k clusters (the service would answer 422)
    or keeps no fewer than the stage before it (the stage would cut nothing). `-` as keep means None (the last
    stage keeps k). Raises ValueError when the grid exceeds `max_configs`, so a typo cannot start a day-long run."""
    v = parse_groups(variants)
    n = len(v)
    s = _per_stage(parse_groups(samples), n, "samples")
    kp = _per_stage(parse_groups(keep), n, "keep")
    ag = _per_stage(parse_groups(aggregators), n, "aggregators")
    per_stage: list[list[StageSpec]] = []
    for i in range(n):
        keeps = [None if c == "-" else _int(c, "keep") for c in kp[i]]
        if i == n - 1:
            keeps = [None]  # the last stage keeps the k asked for
        per_stage.append(
            [
                StageSpec(variant, _int(smp, "samples"), kv, agg)
                for variant in v[i]
                for smp in s[i]
                for kv in dict.fromkeys(keeps)
                for agg in ag[i]
            ]
        )
    total = 1
    for choices in per_stage:
        total *= len(choices)
    if total > max_configs:
        raise ValueError(f"the grid has {total} configurations, more than --max-configs {max_configs}")
    configs: list[tuple[StageSpec, ...]] = []
    dropped: list[str] = []
    for combo in itertools.product(*per_stage):
        label = cascade_label(combo)
        cuts = [st.keep for st in combo[:-1]]
        if any(c is None or c < k for c in cuts):
            dropped.append(f"{label}: every stage but the last needs keep >= k={k}")
        elif any(b >= a for a, b in itertools.pairwise(cuts)):
            dropped.append(f"{label}: keep must shrink from stage to stage")
        else:
            configs.append(combo)
    return configs, dropped


def cascade_label(stages: tuple[StageSpec, ...]) -> str:
    """`cnn-s25/2/200 > dense/10`: variant/samples[/keep], with the aggregator when it is not bayes."""
    parts = []
    for st in stages:
        text = f"{st.variant}/{st.samples}" + (f"/{st.keep}" if st.keep is not None else "")
        parts.append(text + (f"[{st.aggregator}]" if st.aggregator != "bayes" else ""))
    return " > ".join(parts)


def stages_payload(stages: tuple[StageSpec, ...]) -> list[dict[str, object]]:
    """The `stages` field of a /v1/query body."""
    return [
        {"variant": st.variant, "samples": st.samples, "keep": st.keep, "aggregator": st.aggregator} for st in stages
    ]
