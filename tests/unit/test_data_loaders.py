"""GSM8K / MATH / DeepScaleR loaders: field mapping, chat template, stable ids, de-duplication, and
malformed rows reported by file, row and field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_cropi.config.loader import ConfigError, from_dict
from megatron_cropi.data import DataConfig, DataError, DatasetFile, HFTokenizer, load_prompt_set, prompt_id
from megatron_cropi.data.loaders import load_dataset_file, read_rows

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _save_tokenizer(path, chat_template: str | None):
    """A tiny character-level HF tokenizer built locally with `tokenizers` (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<|user|>", "<|system|>", "<|assistant|>", "<|end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ?.,+-*/=#$\\{}()^_\n":
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                  additional_special_tokens=specials[2:])
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return _save_tokenizer(tmp_path_factory.mktemp("tok"), CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return HFTokenizer(tok_dir)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GSM = [
    {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
    {"question": "Tom has 1000 apples and buys 234.", "answer": "so\n#### 1,234"},
    {"question": "What is 2+3?", "answer": "again\n#### 5"},  # same question and final answer: duplicate
]


def test_gsm8k_jsonl_chat_template_ids_and_dedup(tmp_path, tok_dir, tokenizer):
    _jsonl(tmp_path / "gsm.jsonl", GSM)
    cfg = DataConfig(kind="files", tokenizer=str(tok_dir), prompt_template="{prompt}",
                     pool=(DatasetFile(path=str(tmp_path / "gsm.jsonl"), format="gsm8k"),))
    s = load_prompt_set(cfg, "pool")
    assert [r.answer for r in s.records] == ["5", "1234"]  # '####' extracted, thousands separator removed
    assert s.dedup.duplicates == 1 and s.summary()["duplicates_removed"] == 1
    assert s.records[0].prompt_id == prompt_id("What is 2+3?", "5")
    assert s.records[0].source == "gsm" and s.records[0].meta["row"] == 1
    ids = s.records[0].token_ids.tolist()
    # the chat template wraps the question: <|user|> ... <|end|><|assistant|>
    vocab = tokenizer.tok.get_vocab()
    assert ids[0] == vocab["<|user|>"] and ids[-2:] == [vocab["<|end|>"], vocab["<|assistant|>"]]
    assert tokenizer.tok.decode(ids[1:-2]) == "What is 2+3?"
    # ids are stable: a second load (another "machine") gives the same ids
    assert [r.prompt_id for r in load_prompt_set(cfg, "pool").records] == [r.prompt_id for r in s.records]


def test_math_parquet_boxed_and_deepscaler_field_mapping(tmp_path, tokenizer):
    pq.write_table(pa.table({"problem": ["Half of one?", "Root of four?"],
                             "solution": ["It is \\boxed{\\frac{1}{2}}.", "First \\boxed{3}, no: \\boxed{2}"]}),
                   tmp_path / "math.parquet")
    recs, rep = load_dataset_file(DatasetFile(path=str(tmp_path / "math.parquet"), format="math"), tokenizer)
    assert [r.answer for r in recs] == ["\\frac{1}{2}", "2"] and rep.rows == 2
    _jsonl(tmp_path / "ds.jsonl", [{"meta": {"q": "Add 1 and 1."}, "final": 2}])
    spec = DatasetFile(path=str(tmp_path / "ds.jsonl"), format="deepscaler", prompt_field="meta.q",
                       answer_field="final", source="dsr")
    recs, _ = load_dataset_file(spec, tokenizer)
    assert recs[0].text == "Add 1 and 1." and recs[0].answer == "2" and recs[0].source == "dsr"


def test_without_chat_template_plain_encoding_and_too_long_dropped(tmp_path):
    tok = HFTokenizer(_save_tokenizer(tmp_path / "plain", None))
    assert not tok.use_chat_template
    _jsonl(tmp_path / "d.jsonl", [{"problem": "ab", "answer": "1"}, {"problem": "a" * 50, "answer": "1"}])
    recs, rep = load_dataset_file(DatasetFile(path=str(tmp_path / "d.jsonl"), format="deepscaler"), tok,
                                  max_prompt_tokens=10)
    assert len(recs) == 1 and rep.too_long == 1
    assert tok.tok.decode(recs[0].token_ids.tolist()) == "ab"


@pytest.mark.parametrize("row,field,message", [
    ({"answer": "#### 1"}, "question", "missing field"),
    ({"question": 17, "answer": "#### 1"}, "question", "expected a string, got int"),
    ({"question": "   ", "answer": "#### 1"}, "question", "empty prompt"),
    ({"question": "q", "answer": ["#### 1"]}, "answer", "expected a string or number, got list"),
    ({"question": "q", "answer": "no marker"}, "answer", "####"),
    ({"question": "q", "answer": None}, "answer", "missing field"),
])
def test_malformed_jsonl_row_names_file_row_and_field(tmp_path, tokenizer, row, field, message):
    path = _jsonl(tmp_path / "bad.jsonl", [GSM[0], row])
    with pytest.raises(DataError) as err:
        load_dataset_file(DatasetFile(path=str(path), format="gsm8k"), tokenizer)
    assert (err.value.path, err.value.row, err.value.field) == (str(path), 2, field)
    assert message in str(err.value) and str(path) in str(err.value) and "row 2" in str(err.value)


def test_non_utf8_bytes_name_the_field(tmp_path, tokenizer):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GSM[0]).encode() + b"\n" + b'{"question": "caf\xe9?", "answer": "#### 1"}\n')
    with pytest.raises(DataError) as err:
        load_dataset_file(DatasetFile(path=str(path), format="gsm8k"), tokenizer)
    assert (err.value.row, err.value.field) == (2, "question") and "UTF-8" in str(err.value)
    pq.write_table(pa.table({"problem": pa.array([b"ok", b"\xff\xfe"], pa.binary()), "answer": ["1", "2"]}),
                   tmp_path / "bin.parquet")
    with pytest.raises(DataError) as err:
        load_dataset_file(DatasetFile(path=str(tmp_path / "bin.parquet"), format="deepscaler"), tokenizer)
    assert (err.value.row, err.value.field) == (2, "problem")


def test_parquet_missing_column_and_bad_files(tmp_path, tokenizer):
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "q.parquet")
    with pytest.raises(DataError, match="row 1, field 'answer': missing field"):
        load_dataset_file(DatasetFile(path=str(tmp_path / "q.parquet"), format="gsm8k"), tokenizer)
    (tmp_path / "junk.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(DataError, match="row 2: not valid JSON"):
        load_dataset_file(DatasetFile(path=str(tmp_path / "junk.jsonl"), format="gsm8k"), tokenizer)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_file(DatasetFile(path=str(tmp_path / "none.jsonl")), tokenizer)


def test_data_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="pool"):
        from_dict(DataConfig, {"kind": "files", "tokenizer": "/x"})
    with pytest.raises(ConfigError, match=r"pool\[0\]\.path"):
        from_dict(DataConfig, {"kind": "files", "tokenizer": "/x", "pool": [{"path": "a.csv"}]})
    with pytest.raises(ConfigError, match="prompt_template"):
        from_dict(DataConfig, {"prompt_template": "no placeholder"})
    cfg = from_dict(DataConfig, {"kind": "files", "tokenizer": "/t", "pool": [{"path": "a.jsonl", "format": "math"}]})
    assert cfg.pool[0].fields == ("problem", "solution", "boxed")


def test_utf8_byte_order_mark_is_accepted_and_rows_equal_the_file_without_it(tmp_path, tokenizer):
    rows = [{"problem": "Café? What is 2+3?", "answer": 5}, {"problem": "Half of one?", "answer": "1/2"}]
    plain = _jsonl(tmp_path / "plain.jsonl", rows)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # what editors / spreadsheet exports write
    assert list(read_rows(bom)) == list(read_rows(plain)) == [(1, rows[0]), (2, rows[1])]
    got, rep = load_dataset_file(DatasetFile(path=str(bom), format="deepscaler"), tokenizer)
    ref, _ = load_dataset_file(DatasetFile(path=str(plain), format="deepscaler"), tokenizer)
    assert rep.rows == 2 and len(got) == len(ref) == 2
    for a, b in zip(got, ref):
        assert (a.prompt_id, a.answer, a.text, a.source, a.meta["row"]) == \
               (b.prompt_id, b.answer, b.text, "bom", b.meta["row"])
        assert a.token_ids.tolist() == b.token_ids.tolist()
    assert got[0].text == "Café? What is 2+3?" and got[0].answer == "5"


@pytest.mark.parametrize("value,literal", [(float("nan"), "NaN"), (float("inf"), "Infinity"),
                                           (float("-inf"), "-Infinity")])
def test_non_finite_reference_answer_is_refused_jsonl(tmp_path, tokenizer, value, literal):
    path = _jsonl(tmp_path / "nan.jsonl", [{"problem": "ok", "answer": 1.5}, {"problem": "q", "answer": value}])
    assert literal in path.read_text()  # json.dumps writes the non-standard literal that json.loads accepts
    with pytest.raises(DataError) as err:
        load_dataset_file(DatasetFile(path=str(path), format="deepscaler"), tokenizer)
    assert (err.value.path, err.value.row, err.value.field) == (str(path), 2, "answer")
    msg = str(err.value)
    assert str(path) in msg and "row 2" in msg and "field 'answer'" in msg and "finite" in msg


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_reference_answer_is_refused_parquet(tmp_path, tokenizer, value):
    path = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"problem": ["ok", "q", "r"], "answer": pa.array([2.0, value, 3.0], pa.float64())}), path)
    with pytest.raises(DataError) as err:
        load_dataset_file(DatasetFile(path=str(path), format="deepscaler"), tokenizer)
    assert (err.value.path, err.value.row, err.value.field) == (str(path), 2, "answer")
    msg = str(err.value)
    assert str(path) in msg and "row 2" in msg and "field 'answer'" in msg and "finite" in msg
