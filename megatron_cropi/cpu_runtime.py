"""Run megatron-core on CPU with gloo: the one place that adapts Megatron's CUDA assumptions.

megatron-core 0.16 is written for CUDA and hard-codes it in a handful of places that a CPU run hits
(file:line in megatron-core 0.16.1, each hit by a CPU run; ``tests/unit/test_cpu_runtime.py``):

* ``torch.cuda.current_device()`` in rotary embeddings (every RoPE forward) and p2p communication;
  ``torch.cuda.synchronize()`` in p2p communication.
* the CUDA RNG tracker (``tensor_parallel/random.py``): ``torch.cuda.get_rng_state/manual_seed``;
  ``_set_cuda_rng_state`` goes through ``_lazy_call`` and silently queues on CPU builds.
* ``device="cuda"`` literals: ``total_num_tokens`` in every ``get_forward_backward_func()`` schedule,
  ``get_default_causal_mask`` (``attention_mask=None``), and ``weight.data.cuda()`` for tied embeddings
  under PP (``language_module.py``); ``device="cuda"`` buffers of DDP's ``param_and_grad_buffer``, the
  optimizers and grad clipping.
* dtype checks by type name in the distributed optimizer (``distrib_optimizer.py:361,420``) and grad
  clipping (``clip_grads.py:167``): ``param.type() == 'torch.cuda.FloatTensor'``. Under the mode a CPU
  float tensor's ``.type()`` reports its CUDA name.

:func:`apply_cpu_runtime` redirects these to the CPU. It is a no-op when CUDA is available, so nothing
here touches the GPU path; it is idempotent, and it is applied by :mod:`megatron_cropi.parallel`
before any model is built. The ``device="cuda"`` literals are rewritten by a global
:class:`~torch.overrides.TorchFunctionMode` on the calling thread (CPU autograd runs backward on the
caller's thread, so hooks see it too).
"""

from __future__ import annotations

import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["apply_cpu_runtime", "cpu_runtime_active", "default_device"]

_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {f"torch.{k}Tensor": f"torch.cuda.{k}Tensor" for k in ("Float", "Half", "BFloat16")}
_lock = threading.Lock()
_applied = False
_mode: "CudaToCpuMode | None" = None


def _is_cuda(device) -> bool:
    if device is None or isinstance(device, torch.dtype):
        return False
    if isinstance(device, int):  # a bare ordinal means a CUDA device to torch
        return True
    try:
        return torch.device(device).type == "cuda"
    except (TypeError, RuntimeError, ValueError):
        return False


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` / ``Tensor.cuda()`` / ``Tensor.to("cuda")`` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The distributed optimizer and grad clipping check dtypes by name ('torch.cuda.FloatTensor').
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


def cpu_runtime_active() -> bool:
    """True once :func:`apply_cpu_runtime` has redirected Megatron to the CPU in this process."""
    return _applied


def default_device() -> torch.device:
    """The device tensors of this process live on: the current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return _CPU


def apply_cpu_runtime() -> bool:
    """Make megatron-core run on CPU. Returns True if applied now or before, False on a CUDA machine.

    Must run before Megatron models are built and before ``model_parallel_cuda_manual_seed``.
    """
    global _applied, _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _applied:
            return True
        torch.cuda.current_device = lambda: _CPU
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
        torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
        # NOT torch.manual_seed: it calls cuda.manual_seed_all, which would recurse into this.
        torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
        torch.cuda.manual_seed_all = lambda seed: None

        import megatron.core.tensor_parallel.random as mrandom

        def _get_rng_state(device="cuda", clone=False, graph_safe=False):
            state = torch.get_rng_state()
            return state.clone() if clone else state

        mrandom._get_cuda_rng_state = _get_rng_state
        mrandom._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: torch.set_rng_state(state)
        # CPU and "CUDA" RNG are one generator now, so the tracker's "CPU RNG state changed within
        # GPU RNG context" warning is always true and always harmless.
        logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)

        _mode = CudaToCpuMode()
        _mode.__enter__()
        _applied = True
    return True
