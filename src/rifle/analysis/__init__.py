"""Analyses of finished runs: backprop in depth (:mod:`.depth`: per-layer weight change, the
``DepthMonitor`` plug-in) and Grad-CAM (:mod:`.cam`). See docs/experiments.md."""
from .cam import cam_for_runs, grad_cam, grad_cam_maps
from .depth import DepthMonitor, layer_profile, relative_change, run_depth, tracked_layers

__all__ = ["DepthMonitor", "cam_for_runs", "grad_cam", "grad_cam_maps", "layer_profile", "relative_change",
           "run_depth", "tracked_layers"]
