"""Analyses of finished runs: backprop in depth (:mod:`.depth`: per-layer weight change and gradient ratios;
:mod:`.runs`: a run folder reloaded; :mod:`.monitor`: the ``DepthMonitor`` plug-in; :mod:`.depth_plots`)
and Grad-CAM (:mod:`.cam`). See docs/experiments.md."""

from .cam import cam_for_runs, grad_cam, grad_cam_maps
from .depth import layer_profile, relative_change, tracked_layers
from .monitor import DepthMonitor
from .runs import run_depth

__all__ = [
    "DepthMonitor",
    "cam_for_runs",
    "grad_cam",
    "grad_cam_maps",
    "layer_profile",
    "relative_change",
    "run_depth",
    "tracked_layers",
]
