"""The projection probe measures the stage's scoring options against full exact scoring.

With ``scoring.last_layers: 1`` (+ ``truncate_backward``) and 2 of 4 responses per prompt, the stage's
features leave out parameters and responses; the probe's exact reference does not (every parameter,
every stored response). Run twice on the same data: the probe of plain scoring agrees with the exact
reference far better than the probe of the cheap options (the figures measure the options' cost, not
only the projection's).
"""

import json

import pytest
import yaml

CHEAP = {"scoring.last_layers": 1, "scoring.truncate_backward": True, "scoring.max_responses_per_prompt": 2}


@pytest.mark.timeout(600)
def test_probe_reference_is_full_scoring(tmp_path):
    from megatron_cropi.testing.cli import run_cli
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    probes = {}
    for name, extra in (("plain", {}), ("cheap", CHEAP)):
        cfg = tiny_curriculum_config(str(tmp_path / name), **{"curriculum.stages": 1, "curriculum.probe_prompts": 16,
                                                              "projection.k": 4096, **extra})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        rc, log = run_cli(["run", str(path)], timeout=300)
        assert rc == 0, log[-4000:]
        probes[name] = json.loads((tmp_path / name / "reports" / "stage0.json").read_text())["projection_probe"]
    for probe in probes.values():
        assert probe["reference"].startswith("exact gradients of every parameter"), probe
        assert probe["probe_prompts"] >= 3
    assert probes["plain"]["spearman"] > 0.9, probes["plain"]
    assert probes["cheap"]["mean_abs_cosine_error"] > 2 * probes["plain"]["mean_abs_cosine_error"], probes
