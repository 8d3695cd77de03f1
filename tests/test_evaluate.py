"""Held-out evaluation helpers: the periodic-eval subset and sampled (avg@k) accuracy."""
from PIL import Image

from rl.data import Record
from rl.evaluate import eval_subset, format_table, sampled_accuracy


def test_eval_subset_spreads_over_a_file_grouped_by_task():
    records = [f"{task}-{i}" for task in ("counting", "grounding", "math", "caption") for i in range(50)]
    subset = eval_subset(records, 20)
    assert len(subset) == 20 and len(set(subset)) == 20
    assert {r.split("-")[0] for r in subset} == {"counting", "grounding", "math", "caption"}
    assert all(sum(r.startswith(t) for r in subset) == 5 for t in ("counting", "math"))
    assert eval_subset(records, 0) == records and eval_subset(records, 500) == records


def _record(tmp_path, rid, task, answer):
    img = tmp_path / f"{rid}.png"
    Image.new("RGB", (84, 84)).save(img)
    return Record(id=rid, task=task, images=[img],
                  messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}],
                  answer=answer)


def test_sampled_accuracy_is_the_mean_over_every_sample_and_needs_the_format(tmp_path):
    a, b = _record(tmp_path, "a", "counting", "3"), _record(tmp_path, "b", "counting", "2")
    cap = _record(tmp_path, "c", "caption", None)
    samples = [["<think>x</think>3", "<think>x</think>4", "3"],            # right, wrong, unformatted
               ["<think>y</think>2", "<think>y</think>2", "<think>y</think>2"],
               ["<think>z</think>a red square"] * 3]
    acc = sampled_accuracy([a, b, cap], samples)
    assert acc == {"counting": 4 / 6, "all": 4 / 6}                        # caption has no rule answer
    table = {"counting": {"n": 2, "format": 1.0, "accuracy": 0.5, "sampled_accuracy": acc["counting"]},
             "caption": {"n": 1, "format": 1.0, "accuracy": None}}
    lines = format_table(table).splitlines()
    assert "sampled" in lines[0] and "66.7%" in lines[1] and lines[2].rstrip().endswith("-")
