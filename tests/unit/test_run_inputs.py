"""`cropi run` refuses bad inputs with a clear message: empty pool, missing target set, tiny ratio."""

import pytest

from megatron_cropi.cli import main


def _cfg(tmp_path, synthetic: str, selection: str = "{policy: cropi, ratio: 0.1}"):
    path = tmp_path / "c.yaml"
    path.write_text(f"""
run: {{output_dir: {tmp_path}/out, seed: 1, num_threads: 1}}
model: {{preset: cpu-default}}
data: {{kind: synthetic, synthetic: {synthetic}}}
selection: {selection}
curriculum: {{stages: 1, steps_per_stage: 1, warmup: {{enabled: false}}}}
rollout: {{progress: false}}
""")
    return str(path)


@pytest.mark.parametrize("synthetic, fragment", [
    ("{per_family: 0}", "the pool is empty"),
    ("{per_family: 4, val_size: 0}", "no target set"),
])
def test_bad_data_exits_2_with_a_clear_message(tmp_path, capsys, synthetic, fragment):
    assert main(["run", _cfg(tmp_path, synthetic)]) == 2
    assert fragment in capsys.readouterr().err


def test_ratio_that_selects_nothing(tmp_path, capsys):
    cfg = _cfg(tmp_path, "{per_family: 1, families: [cmp, add1], val_size: 4, test_size: 4, check_per_family: 1}",
               "{policy: random, ratio: 0.1}")
    assert main(["run", cfg]) == 2
    assert "selects no prompt from a pool of 2" in capsys.readouterr().err
