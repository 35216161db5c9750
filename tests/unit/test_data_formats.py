"""verl's Parquet and slime's JSONL as input: the question inside a chat list, the answer inside
``reward_model``, the source from ``data_source``; and the selection exports read back through them."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_cropi.config.loader import from_dict
from megatron_cropi.data import DataError, DatasetFile
from megatron_cropi.data.exports import export_rows, verl_schema_problems, write_slime_jsonl, write_verl_parquet
from megatron_cropi.data.loaders import load_dataset_file
from megatron_cropi.data.prompt_ids import prompt_id
from megatron_cropi.records import PromptRecord


class WordTokenizer:
    """Enough of a tokenizer for the loaders: one id per character (the text itself is what is tested)."""

    vocab_size = 256

    def encode_prompt(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, token_ids):
        return "".join(map(chr, token_ids))


VERL_ROWS = [  # as verl's examples/data_preprocess/math_dataset.py writes MATH
    {"data_source": "DigitalLearningGmbH/MATH-lighteval",
     "prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is $1+1$? Let's think step by step."}],
     "ability": "math", "reward_model": {"style": "rule", "ground_truth": "2"},
     "extra_info": {"split": "train", "index": 0}},
    {"data_source": "openai/gsm8k",
     "prompt": [{"role": "user", "content": "Natalia sold 48 clips. How many?"}],
     "ability": "math", "reward_model": {"style": "rule", "ground_truth": "72"},
     "extra_info": {"split": "train", "index": 1}},
]


def test_verl_parquet_reads_question_answer_and_source(tmp_path):
    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(VERL_ROWS), path)
    recs, report = load_dataset_file(from_dict(DatasetFile, {"path": str(path), "format": "verl"}), WordTokenizer())
    assert report.rows == 2
    assert [r.text for r in recs] == ["What is $1+1$? Let's think step by step.", "Natalia sold 48 clips. How many?"]
    assert [r.answer for r in recs] == ["2", "72"]
    assert [r.source for r in recs] == ["DigitalLearningGmbH/MATH-lighteval", "openai/gsm8k"]
    assert recs[0].prompt_id == prompt_id(recs[0].text, "2")
    # an explicit source wins over data_source
    recs, _ = load_dataset_file(from_dict(DatasetFile, {"path": str(path), "format": "verl", "source": "mine"}),
                                WordTokenizer())
    assert {r.source for r in recs} == {"mine"}
    # verl's dataset README shows ``ground_truth: ["72"]``: a one-element list is the answer
    listed = [{**row, "reward_model": {"style": "rule", "ground_truth": [row["reward_model"]["ground_truth"]]}}
              for row in VERL_ROWS]
    pq.write_table(pa.Table.from_pylist(listed), path)
    recs, _ = load_dataset_file(from_dict(DatasetFile, {"path": str(path), "format": "verl"}), WordTokenizer())
    assert [r.answer for r in recs] == ["2", "72"]


def test_slime_jsonl_string_and_chat_prompts(tmp_path):
    path = tmp_path / "dapo.jsonl"
    path.write_text(json.dumps({"prompt": "Compute 3*4.", "label": "12"}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "Compute 5*5."}], "label": 25,
                                  "metadata": {"id": 7}}) + "\n")
    recs, _ = load_dataset_file(from_dict(DatasetFile, {"path": str(path), "format": "slime"}), WordTokenizer())
    assert [(r.text, r.answer, r.source) for r in recs] == [("Compute 3*4.", "12", "dapo"), ("Compute 5*5.", "25", "dapo")]


def test_chat_list_without_user_message_names_row_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "system", "content": "x"}], "label": "1"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, row 1, field 'prompt': .*'user' message"):
        load_dataset_file(from_dict(DatasetFile, {"path": str(path), "format": "slime"}), WordTokenizer())


def _records(n=3):
    return [PromptRecord(prompt_id(f"q{i} + {i}", str(2 * i)), np.zeros(3, np.int32), answer=str(2 * i),
                         source="add" if i % 2 else "cmp", text=f"q{i} + {i}", meta={"family": "add", "row": i})
            for i in range(n)]


def test_exports_follow_verl_fields_and_read_back_as_the_same_prompts(tmp_path):
    recs = _records()
    rows = export_rows(recs, [0.9, 0.5, float("-inf")], system_prompt="You are terse.")
    parquet = write_verl_parquet(tmp_path / "sel.parquet", rows)
    jsonl = write_slime_jsonl(tmp_path / "sel.jsonl", rows)
    assert verl_schema_problems(parquet) == []
    table = pq.read_table(parquet)
    schema = table.schema
    assert pa.types.is_list(schema.field("prompt").type)
    assert {f.name for f in schema.field("prompt").type.value_type} == {"role", "content"}
    assert {f.name for f in schema.field("reward_model").type} == {"style", "ground_truth"}
    first = table.to_pylist()[0]
    assert first["prompt"][0] == {"role": "system", "content": "You are terse."}
    assert first["extra_info"] == {"index": 0, "prompt_id": recs[0].prompt_id, "score": 0.9, "rank": 1, "split": "train"}
    assert table.to_pylist()[2]["score"] is None  # a non-finite score is null, not NaN
    assert json.loads(first["meta"]) == {"family": "add", "row": 0}
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [x["label"] for x in lines] == ["0", "2", "4"] and lines[1]["prompt_text"] == "q1 + 1"
    assert lines[1]["metadata"] == {"prompt_id": recs[1].prompt_id, "score": 0.5, "rank": 2, "source": "add"}
    # both exports are valid input: the same prompt ids, sources and answers come back
    for path, fmt in ((parquet, "verl"), (jsonl, "slime")):
        back, _ = load_dataset_file(from_dict(DatasetFile, {"path": str(path), "format": fmt}), WordTokenizer())
        assert [r.prompt_id for r in back] == [r.prompt_id for r in recs], fmt
    back, _ = load_dataset_file(from_dict(DatasetFile, {"path": str(parquet), "format": "verl"}), WordTokenizer())
    assert [r.source for r in back] == [r.source for r in recs]


def test_schema_check_names_what_verl_would_refuse(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"data_source": "x", "prompt": "plain text", "ability": "math",
                                          "reward_model": {"style": "rule", "ground_truth": "1"}}]), path)
    problems = verl_schema_problems(path)
    assert problems == ["missing field 'extra_info'"]
    pq.write_table(pa.Table.from_pylist([{"data_source": "x", "prompt": "plain text", "ability": "math",
                                          "reward_model": {"style": "rule", "ground_truth": "1"},
                                          "extra_info": {"index": 0}}]), path)
    assert any("prompt must be a list" in p for p in verl_schema_problems(path))


def test_verl_own_dataset_class_reads_the_export(tmp_path):
    """verl's ``RLHFDataset`` reads the export (runs where verl is importable, e.g. ``pip install --no-deps
    --target DIR verl omegaconf datasets pandas codetiming ray tensordict ...`` on PYTHONPATH)."""
    rl_dataset = pytest.importorskip("verl.utils.dataset.rl_dataset")
    from omegaconf import OmegaConf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>"] + sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 +=<>|")))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    recs = _records()
    parquet = write_verl_parquet(tmp_path / "sel.parquet", export_rows(recs, [0.9, 0.5, 0.1]))
    cfg = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 64, "filter_overlong_prompts": False,
                            "return_raw_chat": True, "truncation": "error", "cache_dir": str(tmp_path / "cache")})
    ds = rl_dataset.RLHFDataset(data_files=[str(parquet)], tokenizer=tok, config=cfg)
    assert len(ds) == len(recs)
    item = ds[1]
    assert item["data_source"] == recs[1].source and item["reward_model"]["ground_truth"] == recs[1].answer
    assert item["extra_info"]["prompt_id"] == recs[1].prompt_id and item["extra_info"]["rank"] == 2
