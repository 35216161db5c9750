"""HF ↔ global-Megatron tensors (hf_mapping), HF config parsing (hf_config), HF directories (hf_io); no processes."""

import itertools
import json
import os

import pytest
import torch

from megatron_cropi.checkpoint.hf import check_checkpoint_matches
from megatron_cropi.checkpoint.hf_io import HFCheckpointReader, HFCheckpointWriter
from megatron_cropi.checkpoint.hf_config import (
    GPTDimensions,
    HFCheckpointError,
    hf_config_from_dimensions,
    model_config_from_hf_config,
)
from megatron_cropi.checkpoint.hf_mapping import (
    hf_to_megatron_global,
    megatron_global_shapes,
    megatron_global_to_hf,
    to_megatron_tensor,
)
from megatron_cropi.model.config import ModelConfig

from megatron_cropi.testing.hf_tiny import QWEN25_1_5B_CONFIG as QWEN25_1_5B  # noqa: E402
from megatron_cropi.testing.hf_tiny import QWEN25_7B_CONFIG as QWEN25_7B  # noqa: E402
from megatron_cropi.testing.hf_tiny import QWEN3_1_7B_CONFIG as QWEN3_1_7B  # noqa: E402
from megatron_cropi.testing.hf_tiny import QWEN3_8B_CONFIG as QWEN3_8B  # noqa: E402


def _dims(nq=4, ng=2, d=8, tied=False, bias=True, layers=2, hidden=16, ffn=24, vocab=32, qk_norm=False):
    return GPTDimensions(num_layers=layers, hidden_size=hidden, num_heads=nq, num_groups=ng, head_dim=d,
                         ffn_hidden_size=ffn, vocab_size=vocab, tied=tied, qkv_bias=bias, qk_norm=qk_norm)


def _random_hf_state(dims, seed=0):
    """Random HF tensors for ``dims``, with signed zeros and NaNs so bit-exactness is really tested."""
    from megatron_cropi.checkpoint.hf_mapping import hf_shapes_for

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in megatron_global_shapes(dims):
        for hf_name, shape in hf_shapes_for(name, dims).items():
            t = torch.randn(shape, generator=gen)
            t.view(-1)[0] = -0.0
            t.view(-1)[-1] = float("nan")
            out[hf_name] = t
    return out


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _same_bits(a, b):
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), f"{k} differs"


def test_qkv_rows_interleave_query_heads_then_key_then_value_per_group():
    dims = _dims(nq=6, ng=2, d=4, hidden=16)
    h, per = 16, 3
    # tag every row of q/k/v with (kind, head, row-in-head) so the layout can be read back
    q = torch.stack([torch.full((h,), 1000.0 + 10 * j + r) for j in range(6) for r in range(4)])
    k = torch.stack([torch.full((h,), 2000.0 + 10 * g + r) for g in range(2) for r in range(4)])
    v = torch.stack([torch.full((h,), 3000.0 + 10 * g + r) for g in range(2) for r in range(4)])
    p = "model.layers.0.self_attn."
    qkv = to_megatron_tensor("decoder.layers.0.self_attention.linear_qkv.weight",
                             {p + "q_proj.weight": q, p + "k_proj.weight": k, p + "v_proj.weight": v}, dims)
    grouped = qkv[:, 0].reshape(2, per + 2, 4)  # [ng, nq/ng + 2, d]
    for g in range(2):
        for j in range(per):
            assert grouped[g, j].tolist() == [1000.0 + 10 * (g * per + j) + r for r in range(4)]
        assert grouped[g, per].tolist() == [2000.0 + 10 * g + r for r in range(4)]
        assert grouped[g, per + 1].tolist() == [3000.0 + 10 * g + r for r in range(4)]


def test_fc1_is_gate_then_up():
    dims = _dims()
    p = "model.layers.1.mlp."
    gate, up = torch.randn(24, 16), torch.randn(24, 16)
    fc1 = to_megatron_tensor("decoder.layers.1.mlp.linear_fc1.weight",
                             {p + "gate_proj.weight": gate, p + "up_proj.weight": up}, dims)
    assert torch.equal(fc1[:24], gate) and torch.equal(fc1[24:], up)


# attention: "bias" (Qwen2), "plain" (Llama), "qk_norm" (Qwen3: q/k norms, no bias)
@pytest.mark.parametrize("nq,ng,d,tied,attention,fused", [
    (nq, ng, d, tied, attention, fused)
    for (nq, ng), d, tied, attention, fused in itertools.product(
        [(4, 4), (4, 2), (6, 1), (8, 2)], [4, 12], [False, True], ["bias", "plain", "qk_norm"], [False, True])
])
def test_round_trip_is_bit_exact_both_ways(nq, ng, d, tied, attention, fused):
    dims = _dims(nq=nq, ng=ng, d=d, tied=tied, bias=attention == "bias", qk_norm=attention == "qk_norm")
    hf = _random_hf_state(dims, seed=nq * 100 + ng * 10 + d)
    meg = hf_to_megatron_global(hf, dims, fused_norms=fused)
    assert set(meg) == set(megatron_global_shapes(dims, fused_norms=fused))
    assert all(tuple(meg[k].shape) == s for k, s in megatron_global_shapes(dims, fused_norms=fused).items())
    assert any(k.endswith("linear_qkv.layer_norm_weight") for k in meg) == fused
    assert ("output_layer.weight" in meg) != tied and ("lm_head.weight" in hf) != tied
    assert any(k.endswith("self_attention.q_layernorm.weight") for k in meg) == (attention == "qk_norm")
    back = megatron_global_to_hf(meg, dims)
    _same_bits(back, hf)
    _same_bits(hf_to_megatron_global(back, dims, fused_norms=fused), meg)


def test_round_trip_keeps_bfloat16():
    dims = _dims()
    hf = {k: v.to(torch.bfloat16) for k, v in _random_hf_state(dims).items()}
    back = megatron_global_to_hf(hf_to_megatron_global(hf, dims), dims)
    _same_bits(back, hf)


def test_conversion_errors_name_the_tensor():
    dims = _dims()
    hf = _random_hf_state(dims)
    bad = dict(hf, **{"model.layers.1.self_attn.v_proj.weight": torch.zeros(8, 16)})
    with pytest.raises(HFCheckpointError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight.*\(8, 16\).*\(16, 16\)"):
        hf_to_megatron_global(bad, dims)
    missing = {k: v for k, v in hf.items() if k != "model.norm.weight"}
    with pytest.raises(HFCheckpointError, match=r"'model\.norm\.weight'.*missing"):
        hf_to_megatron_global(missing, dims)
    # a Qwen2 checkpoint (QKV bias) read as a model without QKV bias: the biases would be dropped
    with pytest.raises(HFCheckpointError, match=r"not used by the model.*q_proj\.bias"):
        hf_to_megatron_global(hf, _dims(bias=False))
    meg = hf_to_megatron_global(hf, dims)
    meg["decoder.layers.0.mlp.linear_fc2.weight"] = torch.zeros(16, 25)
    with pytest.raises(HFCheckpointError, match=r"decoder\.layers\.0\.mlp\.linear_fc2\.weight.*\(16, 25\)"):
        megatron_global_to_hf(meg, dims)


def test_qwen3_qk_norms_map_one_to_one_and_are_checked():
    dims = _dims(d=12, bias=False, qk_norm=True)
    hf = _random_hf_state(dims)
    meg = hf_to_megatron_global(hf, dims)
    for i in range(2):
        for m, h in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
            assert meg[f"decoder.layers.{i}.self_attention.{m}.weight"] is hf[f"model.layers.{i}.self_attn.{h}.weight"]
            assert meg[f"decoder.layers.{i}.self_attention.{m}.weight"].shape == (12,)  # head_dim, not hidden
    # a Qwen3 checkpoint read as a model without q/k norms: the norms would be dropped
    with pytest.raises(HFCheckpointError, match=r"not used by the model.*q_norm\.weight"):
        hf_to_megatron_global(hf, _dims(d=12, bias=False))
    # a Qwen2/Llama checkpoint read as a Qwen3 model: the norms are missing
    with pytest.raises(HFCheckpointError, match=r"'model\.layers\.0\.self_attn\.q_norm\.weight'.*missing"):
        hf_to_megatron_global(_random_hf_state(_dims(d=12, bias=False)), dims)
    bad = dict(hf, **{"model.layers.1.self_attn.k_norm.weight": torch.ones(16)})
    with pytest.raises(HFCheckpointError, match=r"k_norm\.weight.*\(16,\).*\(12,\)"):
        hf_to_megatron_global(bad, dims)
    with pytest.raises(HFCheckpointError, match=r"unexpected \['decoder\.layers\.0\.self_attention\.q_layernorm"):
        megatron_global_to_hf(meg, _dims(d=12, bias=False))
    with pytest.raises(HFCheckpointError, match="no q/k norms"):
        to_megatron_tensor("decoder.layers.0.self_attention.k_layernorm.weight", hf, _dims(d=12, bias=False))


def test_tied_checkpoint_may_carry_a_redundant_lm_head():
    dims = _dims(tied=True)
    hf = _random_hf_state(dims)
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"].clone()
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    assert "output_layer.weight" not in hf_to_megatron_global(hf, dims)


@pytest.mark.parametrize("hf,preset", [(QWEN25_1_5B, "qwen2.5-1.5b"), (QWEN25_7B, "qwen2.5-7b")])
def test_real_qwen25_configs_match_our_presets(hf, preset):
    cfg = model_config_from_hf_config(hf)
    ref = ModelConfig(preset=preset)
    assert cfg.preset == "custom" and cfg.params_dtype == "bfloat16"
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "add_qkv_bias", "layernorm_epsilon", "gated_linear_unit", "normalization"):
        assert cfg.transformer[key] == ref.transformer[key], key
    assert (cfg.vocab_size, cfg.tie_word_embeddings, cfg.rotary_base) == (ref.vocab_size, ref.tie_word_embeddings,
                                                                          ref.rotary_base)
    assert cfg.num_parameters() == ref.num_parameters()
    assert "kv_channels" not in cfg.transformer  # head_dim = hidden / heads


@pytest.mark.parametrize("hf,preset", [(QWEN3_1_7B, "qwen3-1.7b"), (QWEN3_8B, "qwen3-8b")])
def test_real_qwen3_configs_match_our_presets(hf, preset):
    cfg = model_config_from_hf_config(hf)
    ref = ModelConfig(preset=preset)
    assert cfg.preset == "custom" and cfg.params_dtype == "bfloat16"
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "add_qkv_bias", "qk_layernorm", "layernorm_epsilon", "gated_linear_unit", "normalization"):
        assert cfg.transformer[key] == ref.transformer[key], key
    assert cfg.transformer["qk_layernorm"] is True and cfg.transformer["add_qkv_bias"] is False
    # head_dim 128 = hidden/heads for these two sizes (not for Qwen3-0.6B/4B/32B): kv_channels only when it differs
    assert ref.transformer["kv_channels"] == 128 and cfg.transformer.get("kv_channels", 128) == 128
    assert (cfg.vocab_size, cfg.tie_word_embeddings, cfg.rotary_base, cfg.max_sequence_length) == (
        ref.vocab_size, ref.tie_word_embeddings, ref.rotary_base, ref.max_sequence_length)
    assert cfg.num_parameters() == ref.num_parameters()
    dims = GPTDimensions.from_model_config(ref)
    assert dims.differences(GPTDimensions.from_hf_config(hf)) == [] and dims.qk_norm and not dims.qkv_bias
    # our config.json for it is a Qwen3 one that parses back to the same model
    out = hf_config_from_dimensions(dims, dtype=torch.bfloat16, max_position_embeddings=40960, base=hf)
    assert out["architectures"] == ["Qwen3ForCausalLM"] and out["model_type"] == "qwen3"
    assert out["head_dim"] == 128 and out["attention_bias"] is False
    assert GPTDimensions.from_hf_config(out) == dims


def test_qwen3_models_differ_from_qwen2_by_qk_norm_and_bad_qwen3_configs_are_named():
    qwen2_like = GPTDimensions.from_hf_config(dict(QWEN3_1_7B, architectures=["Qwen2ForCausalLM"]))
    assert GPTDimensions.from_hf_config(QWEN3_1_7B).differences(qwen2_like) == [
        "qkv_bias: False vs True", "qk_norm: True vs False"]
    with pytest.raises(HFCheckpointError, match="attention_bias=true is not supported for Qwen3"):
        model_config_from_hf_config(dict(QWEN3_1_7B, attention_bias=True))
    with pytest.raises(HFCheckpointError, match="use_sliding_window"):
        model_config_from_hf_config(dict(QWEN3_1_7B, use_sliding_window=True))
    with pytest.raises(HFCheckpointError, match="q/k norms together with a QKV bias"):
        hf_config_from_dimensions(_dims(qk_norm=True, bias=True), dtype=torch.float32, max_position_embeddings=64)


def test_transformers5_rope_parameters_llama_head_dim_and_overrides():
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 128,
          "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}, "dtype": "float32",
          "max_position_embeddings": 2048, "attention_bias": False}
    cfg = model_config_from_hf_config(hf, params_dtype="bfloat16", max_sequence_length=256, layer_spec="local")
    assert cfg.rotary_base == 5e5 and cfg.transformer["kv_channels"] == 32
    assert cfg.transformer["add_qkv_bias"] is False and cfg.transformer["layernorm_epsilon"] == 1e-5
    assert (cfg.params_dtype, cfg.max_sequence_length, cfg.layer_spec) == ("bfloat16", 256, "local")
    assert cfg.tie_word_embeddings is False
    # and back: our config.json says the same
    dims = GPTDimensions.from_model_config(cfg)
    again = GPTDimensions.from_hf_config(hf_config_from_dimensions(dims, dtype=torch.bfloat16,
                                                                   max_position_embeddings=256))
    assert again.differences(dims) == [] and again == dims


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["GPT2LMHeadModel"]}, r"architecture 'GPT2LMHeadModel' is not supported"),
    ({"architectures": [], "model_type": "mistral"}, r"model_type 'mistral' is not supported"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, r"rope_scaling 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}, r"rope_parameters.rope_type 'llama3'"),
    ({"use_sliding_window": True}, r"use_sliding_window"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    ({"hidden_size": None}, r"'hidden_size' is missing"),
])
def test_unsupported_hf_configs_are_named(change, match):
    with pytest.raises(HFCheckpointError, match=match):
        model_config_from_hf_config(dict(QWEN25_1_5B, **change), source="x/config.json")


def test_llama_with_attention_bias_is_rejected():
    hf = dict(QWEN25_1_5B, architectures=["LlamaForCausalLM"], attention_bias=True)
    with pytest.raises(HFCheckpointError, match="attention_bias=true"):
        model_config_from_hf_config(hf)


def _write(out, state, config, **kw):
    with HFCheckpointWriter(out, **kw) as w:
        for k, v in state.items():
            w.add(k, v)
        return w.commit(config)


def _tiny_config(dims):
    return hf_config_from_dimensions(dims, dtype=torch.float32, max_position_embeddings=64)


def test_sharded_write_reads_back_lazily_and_validates(tmp_path):
    dims = _dims()
    hf = _random_hf_state(dims)
    out = _write(tmp_path / "ckpt", hf, _tiny_config(dims), max_shard_bytes=4000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    reader = HFCheckpointReader(out)
    assert reader.names() == set(hf)
    _same_bits(reader.get_many(hf), hf)
    check_checkpoint_matches(reader, dims)  # a correct checkpoint passes
    with pytest.raises(HFCheckpointError, match=r"does not match the model.*num_groups: 1 vs 2"):
        check_checkpoint_matches(reader, _dims(ng=1))
    os.remove(out / files[1])
    with pytest.raises(HFCheckpointError, match=rf"{files[1]}: shard missing.*e\.g\. 'model\."):
        HFCheckpointReader(out)


def test_reader_errors_name_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    dims = _dims()
    hf = _random_hf_state(dims)
    out = _write(tmp_path / "ckpt", hf, _tiny_config(dims))
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    with pytest.raises(HFCheckpointError, match=r"tensor 'nope' is missing"):
        HFCheckpointReader(out).get("nope")
    # checkpoint-level checks from headers only: missing tensor, wrong shape, extra tensor
    for change, match in [
        (lambda s: s.pop("model.layers.1.mlp.down_proj.weight"),
         r"'model\.layers\.1\.mlp\.down_proj\.weight' is missing"),
        (lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(31)}),
         r"'model\.layers\.0\.self_attn\.q_proj\.bias' has shape \(31,\), the model expects \(32,\)"),
        (lambda s: s.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}),
         r"'model\.layers\.9\.mlp.*not used"),
    ]:
        state = dict(hf)
        change(state)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(HFCheckpointError, match=match):
            check_checkpoint_matches(HFCheckpointReader(out), dims)
    raw = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors: truncated"):
        HFCheckpointReader(out)
    os.remove(out / "model.safetensors")
    (out / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(HFCheckpointError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        HFCheckpointReader(out)
    with pytest.raises(HFCheckpointError, match=r"config\.json: missing"):
        HFCheckpointReader(tmp_path)


def test_writer_is_atomic_and_never_loses_the_previous_checkpoint(tmp_path):
    dims = _dims()
    hf = _random_hf_state(dims)
    out = _write(tmp_path / "ckpt", hf, _tiny_config(dims))
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        HFCheckpointWriter(out)
    with pytest.raises(RuntimeError, match="disk on fire"):  # a crash mid-write: old files intact
        with HFCheckpointWriter(out, overwrite=True) as w:
            w.add("a", torch.ones(3))
            raise RuntimeError("disk on fire")
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    changed = dict(hf, **{"model.norm.weight": torch.zeros(16)})
    _write(out, changed, _tiny_config(dims), overwrite=True)
    assert torch.equal(HFCheckpointReader(out).get("model.norm.weight"), torch.zeros(16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("arch,kw", [("qwen2", dict(tied=True)), ("llama", dict(head_dim=32, num_kv_heads=1)),
                                     ("qwen3", dict(head_dim=32)), ("qwen3", dict(tied=True, head_dim=8))])
def test_pure_round_trip_through_files_loads_in_transformers(tmp_path, arch, kw):
    """HF dir → global Megatron → our writer and config.json → transformers: identical logits."""
    from safetensors.torch import load_file

    from megatron_cropi.checkpoint.hf import model_config_from_hf
    from megatron_cropi.testing.hf_tiny import hf_logits, save_tiny_hf_model

    src = save_tiny_hf_model(tmp_path / "src", arch, **kw)
    cfg = model_config_from_hf(src)
    dims = GPTDimensions.from_model_config(cfg)
    meg = hf_to_megatron_global(load_file(str(src / "model.safetensors")), cfg)
    out = _write(tmp_path / "out", megatron_global_to_hf(meg, cfg),
                 hf_config_from_dimensions(dims, dtype=torch.float32, max_position_embeddings=64))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(out, ids), hf_logits(src, ids))
