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
