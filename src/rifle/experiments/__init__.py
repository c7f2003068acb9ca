"""Experiments you can trust: grids of paired runs (:mod:`.grid`, run by :mod:`.runner` under the claims
of :mod:`.locks`, or by :mod:`.ray_engine`), statistics over seeds (:mod:`.stats`) and reports that
select on validation only (:mod:`.report`). See docs/experiments.md."""

from .grid import Grid, GridError, RunSpec, expand, load_grid, parse_grid
from .runner import run_grid
from .stats import PairedDiff, mean_std, paired_difference, t_interval

__all__ = [
    "Grid",
    "GridError",
    "RunSpec",
    "expand",
    "load_grid",
    "parse_grid",
    "run_grid",
    "PairedDiff",
    "mean_std",
    "paired_difference",
    "t_interval",
]
