"""Is the weights host reachable, are the weights cached? Fail at once instead of retrying for a minute.

A TCP connection of at most ``HUB_TIMEOUT_S`` seconds (through the proxy, if any) or ``HF_HUB_OFFLINE=1``
decides; cached weights (Hugging Face hub cache, torch hub checkpoints) still load (docs/models.md#offline).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

import torch

from .common import ModelError

_OFFLINE_HINT = (
    "use weights you have (--pretrained-file PATH: a safetensors or torch state dict of this "
    "architecture), pretrained=False (--no-pretrained) or an offline built-in (efficientnet_lite0/1/2)"
)
HUB_TIMEOUT_S = 3.0  # the reachability check of a weights host, DNS included


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _env_offline() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1): the user says there is no network."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def reachable(url: str, timeout: float = HUB_TIMEOUT_S) -> tuple[bool, str]:
    """``(can a TCP connection to url's host (or its proxy) be opened within timeout s, what was tried)``.

    Runs in a daemon thread so that a hanging DNS lookup is bounded by ``timeout`` too.
    """
    import urllib.parse
    import urllib.request

    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(u.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        pu = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = pu.hostname or host, pu.port or 80
    target = f"{host}:{port}"
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True, name="rifle-reachable")
    t.start()
    t.join(timeout)
    return bool(result and result[0]), target


@contextlib.contextmanager
def _hf_offline():
    """huggingface_hub's offline mode for this call: cached files load, nothing is requested."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _torch_hub_cached(url: str) -> bool:
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])).is_file()


def _no_network(name: str, why: str, source: str) -> ModelError:
    return ModelError(
        f"{name} needs pretrained weights from {source}, but {why}, and they are not in the "
        f"local cache: {_OFFLINE_HINT} (docs/models.md#offline)"
    )


def _offline_error(name: str, e: BaseException) -> ModelError:
    return ModelError(
        f"could not fetch pretrained weights for {name} (no network?): {_OFFLINE_HINT} "
        f"[{type(e).__name__}: {e}]"
    )


def _timm_offline(name: str) -> tuple[str, str] | None:
    """``(why, source)`` when timm's weights for ``name`` must come from the local cache only: the hub is
    unreachable or HF_HUB_OFFLINE=1; ``None`` when the network can be used."""
    from timm.models import get_pretrained_cfg

    hub_name = name.split(":", 1)[1] if name.startswith(("hf-hub:", "hf_hub:")) else None
    cfg = None if hub_name else get_pretrained_cfg(name)
    if cfg is None and hub_name is None:
        return None
    hub_id = hub_name or (cfg.hf_hub_id if cfg is not None else None)
    if hub_id:  # what timm prefers (its _resolve_pretrained_source)
        from huggingface_hub import constants

        source = f"the Hugging Face hub ({hub_id})"
        if _env_offline() or constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE=1 is set", source
        up, target = reachable(constants.ENDPOINT)
        return None if up else (f"{target} cannot be reached (no network?)", source)
    url = cfg.url if cfg is not None else None  # timm's type allows a (url, ...) tuple; it sets a string
    if isinstance(url, str) and url and not _torch_hub_cached(url):
        if _env_offline():
            raise _no_network(name, "HF_HUB_OFFLINE=1 is set", url)
        up, target = reachable(url)
        if not up:
            raise _no_network(name, f"{target} cannot be reached (no network?)", url)
    return None


def _torchvision_offline(name: str, url: str) -> None:
    """Raise at once when torchvision's weights for ``name`` (at ``url``) are not cached and the host is
    unreachable or HF_HUB_OFFLINE=1 is set."""
    if not _torch_hub_cached(url):
        up, target = (False, "HF_HUB_OFFLINE=1") if _env_offline() else reachable(url)
        if not up:
            why = (
                "HF_HUB_OFFLINE=1 is set"
                if target == "HF_HUB_OFFLINE=1"
                else f"{target} cannot be reached (no network?)"
            )
            raise _no_network(f"torchvision:{name}", why, url)
