"""Truncated backward: the scoring backward stops below the lowest scored module.

When only a subset of the parameters is scored (``scoring.include_params``, ``scoring.last_layers``),
the loss gradient is needed only at and above the lowest module holding a scored parameter. Number
the modules along the model: ``0`` the embedding, ``i + 1`` global decoder layer ``i``, ``N + 1`` the
final norm, ``N + 2`` the output layer (``N`` layers; a tied output layer shares the embedding's
weight, so on a single stage it sits at ``0``). Let ``c`` be the lowest position of a scored parameter
over the whole pipeline (a MIN over the PP group; TP ranks hold the same modules).

* ``c = 0``: nothing is cut.
* The stage holding module ``c``: a forward pre-hook replaces that module's input ``h`` by
  ``h.detach()``, in batched capture (frozen weights: the graph has no other root) by a fresh leaf
  that requires grad. Nothing below is on the backward's path from the loss, so it is not computed.
  Every scored gradient is unchanged: ``∂L/∂θ`` of a parameter at or above ``c`` depends only on the
  backward from the loss down to its module (the chain rule never needs ``∂L/∂h`` below it).
* A stage entirely below ``c``: the same detach (no leaf) at its first layer; its output then does not
  require grad and Megatron's schedule skips its backward.
* On such stages other than the first, the schedule sends the stage input's ``.grad`` back after the
  backward: it would be None and the previous stage would wait for it forever, so it is preset to
  zeros (the previous stages, all below ``c``, ignore it).

Under the interleaved schedule each model chunk gets its own cut by the same rules (a chunk is a stage
with its own input and output: a chunk below ``c`` that is not the model's first presets its input's
gradient too).

Under full activation recomputation a checkpointed chunk below the cut on a *later* stage still
recomputes with zero output gradients (Megatron's checkpoint function materialises them): correct,
only less saved. The first stage is not affected (its chunks below the cut have no graph).
"""

from __future__ import annotations

import contextlib

import torch

from megatron_cropi.parallel import ParallelGroups

__all__ = ["parameter_positions", "lowest_scored_position", "BackwardCut"]


def _bare(model):
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def parameter_positions(model) -> dict[int, int]:
    """``{id(param): position}`` for every parameter of this stage (see the module docstring).

    Parameters outside the embedding, the decoder layers, the final norm and the output layer get
    ``0`` (never cut above them).
    """
    m = _bare(model)
    n = int(m.config.num_layers)
    out = {}
    for name, p in m.named_parameters():
        if name.startswith("decoder.layers."):
            pos = int(m.decoder.layers[int(name.split(".")[2])].layer_number)
        elif name.startswith("decoder.final_layernorm."):
            pos = n + 1
        elif name.startswith("output_layer."):
            pos = n + 2
        else:
            pos = 0
        out[id(p)] = pos
    return out


def lowest_scored_position(model, groups: ParallelGroups, scored_names) -> int:
    """``c``: the lowest position of a parameter named in ``scored_names`` (local names of
    ``model.named_parameters()``) over the pipeline; ``N + 3`` when nothing is scored anywhere.

    Under the interleaved schedule ``model`` is the list of this rank's chunks and ``scored_names`` one
    collection of local names per chunk (positions are global, so the minimum is over every chunk).

    A collective over the PP group: every stage of a pipeline must call it.
    """
    import torch.distributed as dist

    if isinstance(model, (list, tuple)):
        pairs = list(zip(model, scored_names, strict=True))
    else:
        pairs = [(model, scored_names)]
    mine = []
    for chunk, chunk_names in pairs:
        pos = parameter_positions(chunk)
        names = set(chunk_names)
        mine += [pos[id(p)] for name, p in chunk.named_parameters() if name in names]
    value = torch.tensor([min(mine, default=int(_bare(pairs[0][0]).config.num_layers) + 3)], dtype=torch.int64)
    if groups.pp_size > 1:
        value = value.to(groups.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=groups.pp)
    return int(value.item())


class BackwardCut(contextlib.AbstractContextManager):
    """Installs the cut for the lowest scored position ``c`` (see the module docstring) while entered.

    Args:
        model: this rank's model stage.
        lowest: ``c`` from :func:`lowest_scored_position`.
        root: make the cut a leaf that requires grad (batched capture's frozen weights); False for
            per-prompt capture, whose scored weights require grad themselves.
    """

    def __init__(self, model, lowest: int, *, root: bool):
        m = _bare(model)
        self.model, self.lowest, self.root = m, lowest, root
        self._handles: list = []
        n = int(m.config.num_layers)
        layers = list(m.decoder.layers)
        targets = {int(layer.layer_number): layer for layer in layers}
        if getattr(m, "post_process", True):
            if getattr(m.decoder, "final_layernorm", None) is not None:
                targets[n + 1] = m.decoder.final_layernorm
            if getattr(m, "output_layer", None) is not None:
                targets[n + 2] = m.output_layer
        top = max([*targets, 0])  # the highest position on this stage
        self.module, self.leaf = None, False
        if lowest <= 0:
            return
        if lowest in targets:
            self.module, self.leaf = targets[lowest], root
        elif top < lowest and layers:  # the whole stage is below the cut
            self.module = layers[0]

    @property
    def active(self) -> bool:
        return self.module is not None

    def _pre_hook(self, module, args, kwargs):
        decoder = self.model.decoder
        stage_input = getattr(decoder, "input_tensor", None)
        if not decoder.pre_process and isinstance(stage_input, torch.Tensor) and stage_input.requires_grad \
                and stage_input.grad is None:
            stage_input.grad = torch.zeros_like(stage_input)  # what the schedule sends back: see above
        if "hidden_states" in kwargs:
            h = kwargs["hidden_states"]
            kwargs = {**kwargs, "hidden_states": self._cut(h)}
        else:
            args = (self._cut(args[0]),) + tuple(args[1:])
        return args, kwargs

    def _cut(self, h: torch.Tensor) -> torch.Tensor:
        out = h.detach()
        return out.requires_grad_(True) if self.leaf else out

    def __enter__(self):
        if self.module is not None:
            self._handles.append(self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False
