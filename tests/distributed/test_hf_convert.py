"""HF Qwen2/Qwen3/Llama checkpoints in and out of a real Megatron GPTModel on gloo.

Tiny random HF models (fp32, tied and untied, GQA, a Llama with head_dim ≠ hidden/heads, Qwen3 with
its q/k norms and head_dim ≠ hidden/heads) are saved locally; loaded at TP=1, TP=2, PP=2 (and
TP=2×PP=2) their Megatron logits equal HF transformers' to 1e-4; exported from TP=2 and PP=2 they equal the original safetensors bit for bit,
and importing the export gives back the same parameters bit for bit. Bad checkpoints fail on every
rank with an error naming the tensor, and a failed export does not leave ranks waiting.
"""

import json

import pytest
import torch

from megatron_cropi.testing.hf_tiny import hf_logits, save_tiny_hf_model
from megatron_cropi.testing.spawn import run_ranks

SEQ, BATCH = 12, 2
MODELS = {  # name -> (arch, config overrides, the layout it is exported from)
    "qwen2-untied": ("qwen2", dict(tied=False), (2, 1)),
    "qwen2-tied": ("qwen2", dict(tied=True, num_kv_heads=4), (1, 2)),
    "llama-untied-hd32": ("llama", dict(tied=False, head_dim=32), (1, 2)),
    "llama-tied": ("llama", dict(tied=True, rope_theta=5e5), (2, 1)),
    # Qwen3: q/k RMSNorm per head, no QKV bias; head_dim 32 ≠ 64/4 (and 8 ≠ 64/4 below)
    "qwen3-untied-hd32": ("qwen3", dict(tied=False, head_dim=32), (2, 1)),
    "qwen3-tied-hd8": ("qwen3", dict(tied=True, head_dim=8, num_kv_heads=4), (1, 2)),
}
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


def _forward_logits(model, groups, ids):
    """Full ``[B, S, V]`` logits on the last stage's TP rank 0 (None elsewhere), via Megatron's schedule."""
    import torch.distributed as dist

    from megatron_cropi.model.schedule import causal_attention_mask, forward_backward

    mask = causal_attention_mask(SEQ, groups.device)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        out = model(input_ids=tokens, position_ids=pos, attention_mask=mask)
        return out, lambda output: (output.float().sum() * 0.0, {"logits": output.detach().float().clone()})

    reduced = forward_backward(model, groups, forward_step_func=forward_step, data_iterator=iter([ids]),
                               num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH, forward_only=True)
    if not groups.is_last_stage:
        return None
    local = reduced[0]["logits"]  # [B, S, V/TP]
    parts = [torch.empty_like(local) for _ in range(groups.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=groups.tp)
    return torch.cat(parts, dim=-1) if groups.tp_rank == 0 else None


def _read_safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _bitwise_equal(a, b):
    same_bits = torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    return a.dtype == b.dtype and a.shape == b.shape and same_bits


def _convert_worker(hf_dirs, layouts, export_layouts, ids, out_root, bad_dirs):
    import torch.distributed as dist

    from megatron_cropi.checkpoint import (
        GPTDimensions,
        HFCheckpointError,
        iter_global_tensors,
        load_hf_into_model,
        model_config_from_hf,
        save_model_as_hf,
    )
    from megatron_cropi.checkpoint.hf_mapping import megatron_global_shapes
    from megatron_cropi.model.params import param_layouts
    from megatron_cropi.model.provider import build_gpt_model
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups, init_distributed

    init_distributed()
    rank = dist.get_rank()
    out = {"logits": {}, "reimport_equal": {}, "names_ok": {}, "errors": {}}
    for name, hf_dir in hf_dirs.items():
        cfg = model_config_from_hf(hf_dir)
        for tp, pp in layouts:
            groups = build_parallel_groups(tp, pp)
            model = build_gpt_model(cfg, groups)
            load_hf_into_model(model, groups, hf_dir)
            # our global names/shapes are exactly those of the model Megatron builds
            mine = {lay.global_name: lay.global_shape for lay in param_layouts(model, groups).values()}
            everything = [None] * dist.get_world_size()
            dist.all_gather_object(everything, mine)
            merged = {k: v for part in everything for k, v in part.items()}
            out["names_ok"][(name, tp, pp)] = merged == megatron_global_shapes(GPTDimensions.from_model(model))
            logits = _forward_logits(model, groups, ids)
            if logits is not None:
                out["logits"][(name, tp, pp)] = logits
            if export_layouts[name] == (tp, pp):
                target = f"{out_root}/{name}-tp{tp}pp{pp}"
                save_model_as_hf(model, groups, cfg, target, source_hf_dir=hf_dir)
                # export -> import: the same parameters, bit for bit
                again = build_gpt_model(cfg, groups)
                load_hf_into_model(again, groups, target)
                first = dict(iter_global_tensors(model, groups, dst=0))
                second = dict(iter_global_tensors(again, groups, dst=0))
                if rank == 0:
                    out["reimport_equal"][(name, tp, pp)] = first.keys() == second.keys() and all(
                        _bitwise_equal(first[k], second[k]) for k in first)
                # a second export to the same place fails on every rank (no hang), the first survives
                try:
                    save_model_as_hf(model, groups, cfg, target)
                except FileExistsError as err:
                    out["errors"][("exists", name)] = str(err)
            destroy_parallel_groups()
    # bad checkpoints: every rank raises, naming the tensor
    groups = build_parallel_groups(2, 1)
    model = build_gpt_model(model_config_from_hf(hf_dirs["qwen2-untied"]), groups)
    for kind, bad in bad_dirs.items():
        try:
            load_hf_into_model(model, groups, bad)
        except HFCheckpointError as err:
            out["errors"][kind] = str(err)
    destroy_parallel_groups()
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs = {name: str(save_tiny_hf_model(root / name, arch, seed=i, **kw))
            for i, (name, (arch, kw, _)) in enumerate(MODELS.items())}
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    refs = {name: hf_logits(d, ids) for name, d in dirs.items()}
    return root, dirs, ids, refs


def _make_bad_dirs(root, good):
    """A wrong-shaped tensor, a missing tensor, and a checkpoint of another config."""
    from safetensors.torch import load_file, save_file

    state = load_file(f"{good}/model.safetensors")
    bad = {}
    for kind in ("shape", "missing", "other_config"):
        d = root / f"bad-{kind}"
        d.mkdir()
        cfg = json.loads((root / "qwen2-untied" / "config.json").read_text())
        s = dict(state)
        if kind == "shape":
            s["model.layers.1.self_attn.k_proj.weight"] = s["model.layers.1.self_attn.k_proj.weight"][:16].clone()
        elif kind == "missing":
            del s["model.layers.0.mlp.up_proj.weight"]
        else:
            cfg["tie_word_embeddings"] = True
            del s["lm_head.weight"]
        save_file(s, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg))
        bad[kind] = str(d)
    return bad


@pytest.mark.timeout(300)
def test_hf_megatron_conversion_on_two_ranks(hf_models):
    root, dirs, ids, refs = hf_models
    layouts = [(1, 1), (2, 1), (1, 2)]
    bad = _make_bad_dirs(root, dirs["qwen2-untied"])
    out_root = root / "exports"
    exports = {name: spec[2] for name, spec in MODELS.items()}
    res = run_ranks(_convert_worker, 2, args=(dirs, layouts, exports, ids, str(out_root), bad), timeout_s=280)
    logits = {k: v for r in res for k, v in r["logits"].items()}
    for name in MODELS:
        for tp, pp in layouts:
            assert res[0]["names_ok"][(name, tp, pp)], f"{name} TP={tp} PP={pp}: global names/shapes differ"
            got, ref = logits[(name, tp, pp)], refs[name]
            assert got.shape == ref.shape == (BATCH, SEQ, 128)
            err = (got - ref).abs().max().item()
            assert err <= 1e-4, f"{name} TP={tp} PP={pp}: max |Megatron - HF| logits = {err:.2e}"
        tp, pp = exports[name]
        export = out_root / f"{name}-tp{tp}pp{pp}"
        original, exported = _read_safetensors(root / name), _read_safetensors(export)
        assert exported.keys() == original.keys(), f"{name}: {exported.keys() ^ original.keys()}"
        for key in original:
            assert _bitwise_equal(exported[key], original[key]), f"{name} TP={tp} PP={pp}: {key} differs"
        assert res[0]["reimport_equal"][(name, tp, pp)], f"{name} TP={tp} PP={pp}: re-import differs"
        cfg = json.loads((export / "config.json").read_text())
        assert cfg["architectures"] == [ARCHITECTURES[MODELS[name][0]]]
        assert (export / "generation_config.json").is_file()  # carried over from the source
        # transformers reads the exported config the same way (rope theta, head_dim, tying)
        assert torch.equal(hf_logits(export, ids), refs[name])
    for rank_result in res:
        errors = rank_result["errors"]
        assert "model.layers.1.self_attn.k_proj.weight" in errors["shape"] and "(16, 64)" in errors["shape"]
        assert "(32, 64)" in errors["shape"]
        assert "model.layers.0.mlp.up_proj.weight" in errors["missing"]
        assert "tied: False vs True" in errors["other_config"]
        assert all("already exists" in errors[("exists", name)] for name in MODELS)


def _tp2pp2_worker(hf_dirs, ids, targets):
    from megatron_cropi.checkpoint import load_hf_into_model, model_config_from_hf, save_model_as_hf
    from megatron_cropi.model.provider import build_gpt_model
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups, init_distributed

    init_distributed()
    out = {}
    for name, hf_dir in hf_dirs.items():
        cfg = model_config_from_hf(hf_dir)
        groups = build_parallel_groups(2, 2)
        model = build_gpt_model(cfg, groups)
        load_hf_into_model(model, groups, hf_dir)
        logits = _forward_logits(model, groups, ids)
        if logits is not None:
            out[name] = logits
        save_model_as_hf(model, groups, cfg, targets[name], max_shard_bytes=40_000)  # several shards + index
        destroy_parallel_groups()
    return out


@pytest.mark.timeout(300)
def test_tp2_by_pp2_tied_qwen2_and_qwen3_on_four_ranks(hf_models):
    root, dirs, ids, refs = hf_models
    names = ("qwen2-tied", "qwen3-untied-hd32")
    targets = {name: str(root / f"tp2pp2-export-{name}") for name in names}
    res = run_ranks(_tp2pp2_worker, 4, args=({n: dirs[n] for n in names}, ids, targets), timeout_s=280)
    logits = [r for r in res if r]
    assert len(logits) == 1 and set(logits[0]) == set(names)
    for name in names:
        err = (logits[0][name] - refs[name]).abs().max().item()
        assert err <= 1e-4, f"{name} TP=2 PP=2: max |Megatron - HF| logits = {err:.2e}"
        target = root / f"tp2pp2-export-{name}"
        index = json.loads((target / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert torch.equal(hf_logits(target, ids), refs[name])
