from megatron_cropi.curriculum.evaluate import EvalLog
def test_eval_log_survives_a_torn_last_line(tmp_path):
    log = EvalLog(tmp_path / "eval.jsonl")
    log.append({"step": 0, "a": 1.0})
    with open(log.path, "a") as f:
        f.write('{"step": 25, "a"')  # the process died mid-append
    assert log.records() == [{"step": 0, "a": 1.0}] and log.at_step(25) is None
    log.append({"step": 25, "a": 2.0})
    assert log.records() == [{"step": 0, "a": 1.0}, {"step": 25, "a": 2.0}]
    log.truncate_after(0)
    assert log.records() == [{"step": 0, "a": 1.0}]


def test_max_prompts_takes_every_source_not_a_prefix():
    from megatron_cropi.curriculum.evaluate import evenly_spaced

    by_source = [f"{src}{i}" for src in "abcde" for i in range(30)]  # a check set ordered by source
    picked = evenly_spaced(by_source, 15)
    assert len(picked) == 15 and len(set(picked)) == 15
    assert {p[0] for p in picked} == set("abcde") and sum(p[0] == "a" for p in picked) == 3
    assert evenly_spaced(by_source, 0) == by_source and evenly_spaced(by_source, 500) == by_source



def test_greedy_evaluation_asks_a_vllm_engine_for_its_own_logprob_mode():
    """A vLLM engine refuses a log-prob mode other than its construction's (``VLLMEngine.logprobs``);
    greedy evaluation, which reads rewards only, must ask for that one, not for raw log-probs."""
    from megatron_cropi.curriculum.evaluate import eval_logprob_mode

    assert eval_logprob_mode("sampling", greedy=True, run_mode="sampling") == "sampling"
    assert eval_logprob_mode("raw", greedy=False, run_mode="sampling") == "raw"
    assert eval_logprob_mode(None, greedy=True, run_mode="sampling") == "raw"  # native sampler, T = 0
    assert eval_logprob_mode(None, greedy=False, run_mode="sampling") == "sampling"
