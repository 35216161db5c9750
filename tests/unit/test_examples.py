"""Every example config passes ``cropi run --dry-run`` on the inputs it names, without GPUs.

The files the configs point at are built under a temporary ``DATA_DIR`` / ``MODEL_DIR``: tiny parquet
files with each format's fields, a tiny tokenizer (``tokenizers`` + ``PreTrainedTokenizerFast``) and
an HF directory whose ``config.json`` is the real Qwen2.5-1.5B/7B-Instruct one (no weights: a dry run
does not read them). Launch scripts pass ``bash -n`` and one runs end to end with ``DRY_RUN=1``.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_cropi.run_config import load_run_config
from megatron_cropi.dryrun import DryRunError, dry_run

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("qwen*_*node.yaml"))  # not the shared *_base.yaml
LAUNCH = sorted((ROOT / "examples" / "launch").glob("*.sh"))

from megatron_cropi.testing.hf_tiny import QWEN25_1_5B_CONFIG as QWEN25_1_5B  # noqa: E402
from megatron_cropi.testing.hf_tiny import QWEN25_7B_CONFIG as QWEN25_7B  # noqa: E402
from megatron_cropi.testing.hf_tiny import QWEN3_1_7B_CONFIG, QWEN3_8B_CONFIG  # noqa: E402
# config.json of Qwen/Qwen2.5-0.5B-Instruct (the GPU smoke config's model)
QWEN25_0_5B = dict(QWEN25_1_5B, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                   num_hidden_layers=24, max_window_layers=21)
SMOKE = ROOT / "examples" / "configs" / "gpu_smoke.yaml"
FIELDS = {"gsm8k": {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5"},
          "math": {"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$."},
          "deepscaler": {"problem": "Compute $2 \\cdot 3$.", "answer": "6"}}


def _write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]", "What", "is",
                                         "1", "2", "+", "?", "user", "assistant", "system"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    fast.save_pretrained(out)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """``(DATA_DIR, {model size: MODEL_DIR})`` holding every file the example configs name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("examples")
    data = root / "data"
    for name, split in [("gsm8k", "train"), ("gsm8k", "valid"), ("gsm8k", "test"), ("math", "train"),
                        ("math", "valid"), ("math", "test"), ("deepscaler", "train")]:
        (data / name).mkdir(parents=True, exist_ok=True)
        rows = [FIELDS[name]] * 5
        pq.write_table(pa.Table.from_pylist(rows), data / name / f"{split}.parquet")
    models = {}
    for size, config in (("1.5b", QWEN25_1_5B), ("7b", QWEN25_7B), ("1.7b", QWEN3_1_7B_CONFIG),
                         ("8b", QWEN3_8B_CONFIG), ("0.5b", QWEN25_0_5B)):
        d = root / (f"Qwen3-{size}" if config["model_type"] == "qwen3" else f"Qwen2.5-{size}-Instruct")
        _write_tokenizer(d)
        (d / "config.json").write_text(json.dumps(config))
        models[size] = d
    return data, models


def _env(inputs, config: Path, out: Path) -> dict:
    data, models = inputs
    size = re.search(r"qwen[0-9.]+-([0-9.]+b)[-_]", config.name).group(1)
    return {"DATA_DIR": str(data), "MODEL_DIR": str(models[size]), "OUTPUT_DIR": str(out)}


def _launch_shape(config: Path) -> tuple[int, int]:
    """(world size, GPUs per node) the config is written for: ``_<N>node`` × 8 GPUs."""
    nodes = int(re.search(r"_(\d+)node", config.name).group(1))
    return nodes * 8, 8


def test_there_are_examples_for_both_models_on_one_and_several_nodes():
    names = {c.name for c in CONFIGS}
    for model in ("qwen2.5-1.5b-instruct", "qwen2.5-7b-instruct"):
        assert f"{model}_1node.yaml" in names
        assert any(n.startswith(model) and not n.endswith("_1node.yaml") for n in names)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_example_config_passes_the_dry_run(config, inputs, tmp_path, monkeypatch):
    for key, value in _env(inputs, config, tmp_path / "run").items():
        monkeypatch.setenv(key, value)
    cfg = load_run_config(config)
    world, per_node = _launch_shape(config)
    summary = dry_run(cfg, world_size=world, gpus_per_node=per_node, gpu_memory_gib=80.0)
    assert summary["nodes"] == world // per_node
    assert summary["memory"]["peak_gib"] <= 80.0
    assert summary["data_rows"]["pool"] == {"gsm8k": 5, "math": 5, "deepscaler": 5}
    assert set(summary["feature_stores_on_disk"]["rows"]) == {"pool", "target-gsm8k", "target-math"}
    # the paper's settings the configs carry
    assert (cfg.rollout.n, cfg.curriculum.pool_samples, cfg.rollout.logprobs) == (8, 8, "sampling")
    assert (cfg.curriculum.behaviour_temperature, cfg.projection.k, cfg.selection.ratio) == (0.5, 32768, 0.1)
    assert cfg.rollout.temperature == 1.0  # GRPO samples at T = 1 (verl), the behaviour rollouts at 0.5
    assert (cfg.grpo.prompts_per_step, cfg.grpo.optim.lr, cfg.grpo.loss.kl_coef, cfg.grpo.loss.kl_type,
            cfg.grpo.loss.entropy_coef) == (128, 1e-6, 0.001, "low_var_kl", 0.001)
    assert cfg.rollout.max_tokens == (2048 if re.search(r"-1\.[57]b", config.name) else 4096)
    if config.name.startswith("qwen3-"):  # Qwen3: q/k norms, head_dim 128, no QKV bias
        t = cfg.model.transformer
        assert (t["qk_layernorm"], t["kv_channels"], t["add_qkv_bias"]) == (True, 128, False)
    assert cfg.selection.fusion == "reciprocal_rank" and {f.source for f in cfg.data.val} == {"gsm8k", "math"}
    # the engine: sharded like the trainer, CUDA graphs on, and its KV minimum inside its share
    v = cfg.rollout.vllm
    assert v.tensor_parallel_size == cfg.parallel.tensor_model_parallel_size and v.enforce_eager is False
    engine = summary["rollout"]["vllm_memory"]
    assert engine["fits"] and engine["cuda_graphs_gib"] > 0 and engine["kv_cache_gib"] >= engine["min_kv_cache_gib"]
    assert all(stage["vllm_gib"] == engine["share_gib"] for stage in summary["memory"]["stages"])


# The engine settings these files had before the budget check (issue 14): vLLM at TP=1 holds the whole
# model in a share sized for one TP=4 shard ("3.8 GB of weights").
OLD_ENGINE = {"qwen2.5-7b-instruct_1node.yaml": ["rollout.vllm.tensor_parallel_size=1", "rollout.batch_prompts=64",
                                                 "rollout.vllm.enforce_eager=true"],
              "qwen3-8b_2node.yaml": ["rollout.vllm.tensor_parallel_size=1", "rollout.batch_prompts=64",
                                      "rollout.vllm.gpu_memory_utilization=0.25", "rollout.vllm.enforce_eager=true"]}


@pytest.mark.parametrize("name", sorted(OLD_ENGINE))
def test_the_dry_run_refuses_the_old_engine_budgets(name, inputs, tmp_path, monkeypatch):
    config = ROOT / "examples" / "configs" / name
    for key, value in _env(inputs, config, tmp_path / "run").items():
        monkeypatch.setenv(key, value)
    world, per_node = _launch_shape(config)
    old = load_run_config(config, OLD_ENGINE[name])
    with pytest.raises(DryRunError) as info:
        dry_run(old, world_size=world, gpus_per_node=per_node, gpu_memory_gib=80.0)
    msg = str(info.value)
    assert "vLLM memory: rollout.vllm.gpu_memory_utilization=" in msg
    assert "rollout.vllm.tensor_parallel_size=1 take 1" in msg and "rollout.batch_prompts=64" in msg
    engine = [line for line in msg.splitlines() if "vLLM memory" in line][0]
    kv_left = float(re.search(r"leaving (-?[0-9.]+) GiB of KV cache", engine).group(1))
    assert kv_left < 3.5, engine        # the whole bf16 model in the share: almost nothing left for KV
    # the fixed file passes
    assert dry_run(load_run_config(config), world_size=world, gpus_per_node=per_node)["rollout"]["vllm_memory"]["fits"]


@pytest.mark.parametrize("gpus", [1, 8])
def test_gpu_smoke_config_passes_the_dry_run_and_is_short(gpus, inputs, tmp_path, monkeypatch):
    data, models = inputs
    for key, value in {"DATA_DIR": str(data), "MODEL_DIR": str(models["0.5b"]),
                       "OUTPUT_DIR": str(tmp_path / "run")}.items():
        monkeypatch.setenv(key, value)
    cfg = load_run_config(SMOKE)
    summary = dry_run(cfg, world_size=gpus, gpus_per_node=gpus, gpu_memory_gib=80.0)
    assert summary["nodes"] == 1 and summary["layout"]["dp"] == gpus
    assert summary["memory"]["peak_gib"] <= 80.0 and summary["rollout"]["vllm_memory"]["fits"]
    # a slice, 2 short stages: minutes of work, not hours
    assert (cfg.curriculum.stages, cfg.curriculum.steps_per_stage) == (2, 5)
    assert all(f.limit and f.limit <= 512 for split in ("pool", "val", "test") for f in cfg.data.files(split))
    assert cfg.rollout.max_tokens <= 512 and cfg.model.preset == "qwen2.5-0.5b"


def test_the_7b_node_files_extend_one_base_and_differ_only_in_their_output_dir(monkeypatch):
    from megatron_cropi.config.compose import compose_config

    monkeypatch.setenv("DATA_DIR", "/data")
    monkeypatch.setenv("MODEL_DIR", "/models/7b")
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    base = ROOT / "examples" / "configs" / "qwen2.5-7b-instruct_base.yaml"
    resolved = {}
    for config in [c for c in CONFIGS if c.name.startswith("qwen2.5-7b-instruct_")]:
        tree = compose_config(config)
        assert tree.files == [str(config), str(config.parent / base.name)]
        assert set(tree.data) == set(compose_config(base).data)
        cfg = load_run_config(config)
        resolved[config.name] = cfg.to_dict()
        assert cfg.run.output_dir == f"runs/{config.stem}"
    assert len(resolved) == 3
    first, *rest = resolved.values()
    for other in rest:
        assert {**other, "run": {**other["run"], "output_dir": ""}} == {**first, "run": {**first["run"], "output_dir": ""}}


def test_the_dry_run_fails_an_example_when_its_inputs_are_wrong(inputs, tmp_path, monkeypatch):
    config = ROOT / "examples" / "configs" / "qwen2.5-7b-instruct_1node.yaml"
    data, models = inputs
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("MODEL_DIR", str(models["1.5b"]))        # the other model's checkpoint
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "run"))
    with pytest.raises(DryRunError) as info:
        dry_run(load_run_config(config), world_size=8, gpus_per_node=8)
    msg = str(info.value)
    assert "data.pool[0].path" in msg and "does not exist" in msg
    assert "rollout.checkpoint" in msg and "hidden_size: 3584 vs 1536" in msg
    monkeypatch.setenv("DATA_DIR", str(data))
    monkeypatch.setenv("MODEL_DIR", str(models["7b"]))
    with pytest.raises(DryRunError, match="over the 40 GiB budget"):
        dry_run(load_run_config(config), world_size=8, gpus_per_node=8, gpu_memory_gib=40.0)


@pytest.mark.parametrize("script", LAUNCH, ids=[s.name for s in LAUNCH])
def test_launch_script_parses_and_never_pkills(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "pkill" not in script.read_text() and "killall" not in script.read_text()


@pytest.mark.parametrize("command", ["run", "train"])
def test_launch_preflight_sees_the_overrides_for_every_command(command, inputs, tmp_path):
    """The preflight dry run gets the launch's overrides (a bad one stops the launch before torchrun),
    for `train` too; DRY_RUN=1 applies them as well."""
    config = ROOT / "examples" / "configs" / "qwen2.5-7b-instruct_1node.yaml"
    env = dict(os.environ, **_env(inputs, config, tmp_path / "run"), NNODES="1", NPROC_PER_NODE="8",
               PYTHON=sys.executable, CROPI_COMMAND=command)
    env["PATH"] = str(tmp_path / "no-torchrun") + os.pathsep + env["PATH"]
    bad = ["rollout.vllm.tensor_parallel_size=1"] + (["--steps", "3"] if command == "train" else [])
    proc = subprocess.run(["bash", str(ROOT / "examples" / "launch" / "launch.sh"), str(config), *bad], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "vLLM memory" in proc.stderr and "torch.distributed.run" not in proc.stderr
    assert "[launch] preflight: cropi run --dry-run" in proc.stderr
    dry = subprocess.run(["bash", str(ROOT / "examples" / "launch" / "launch.sh"), str(config), bad[0]],
                         env=dict(env, DRY_RUN="1"), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert dry.returncode == 2 and "rollout.vllm.tensor_parallel_size=1" in dry.stderr


def test_launch_script_dry_run_uses_the_launch_world_size(inputs, tmp_path):
    config = ROOT / "examples" / "configs" / "qwen2.5-7b-instruct_2node.yaml"
    env = dict(os.environ, **_env(inputs, config, tmp_path / "run"), DRY_RUN="1", NNODES="2", NPROC_PER_NODE="8",
               PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "examples" / "launch" / "qwen2.5-7b-instruct.sh")], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    summary = json.loads(out[out.index("{"): out.rindex("}") + 1])
    assert summary["world_size"] == 16 and summary["nodes"] == 2 and summary["gpus_per_node"] == 8
    assert "dry run OK" in out
