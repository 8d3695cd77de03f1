"""Held-out evaluation helpers: the periodic-eval subset and sampled (avg@k) accuracy."""
from PIL import Image

from records import Record, unique_prompts
from rewards.config import RewardConfig
from rewards.evaluate import add_sampled_scores, eval_subset, format_table, judge, summarize
from rollout.greedy import generate_greedy


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
    table = {"counting": {"n": 2, "format": 1.0, "accuracy": 0.5}, "caption": {"n": 1, "format": 1.0, "accuracy": None},
             "all": {"n": 3, "format": 1.0, "accuracy": 0.5}}
    table = add_sampled_scores(table, [a, b, cap], samples, reward_cfg=None)   # no RM: accuracy only
    assert table["counting"]["sampled_accuracy"] == 4 / 6 and table["all"]["sampled_accuracy"] == 4 / 6
    assert set(table["caption"]) == {"n", "format", "accuracy"}            # caption has no rule answer
    del table["all"]
    lines = format_table(table).splitlines()
    assert "sampled" in lines[0] and "66.7%" in lines[1] and lines[2].rstrip().endswith("-")


def test_sampled_scores_add_the_rm_mean_over_every_sample_with_the_format_gate(tmp_path):
    a, cap = _record(tmp_path, "a", "counting", "3"), _record(tmp_path, "c", "caption", None)
    samples = [["<think>x</think>3", "<think>x</think>4"],
               ["<think>z</think>A red circle.", "<think>z</think>A red square.", "A red circle."]]  # last: no format
    seen = []

    def score(items):                       # (image paths, prompt, solution) -> score
        seen.extend(sol for _, _, sol in items)
        return [0.9 if "circle" in sol else 0.3 for _, _, sol in items]

    table = {"counting": {"n": 1, "format": 1.0, "accuracy": 1.0}, "caption": {"n": 1, "format": 1.0, "accuracy": None},
             "all": {"n": 2, "format": 1.0, "accuracy": 1.0}}
    table = add_sampled_scores(table, [a, cap], samples, RewardConfig(), score)
    assert table["counting"]["sampled_accuracy"] == 0.5 and "sampled_rm_score" not in table["counting"]
    assert abs(table["caption"]["sampled_rm_score"] - (0.9 + 0.3 + 0.0) / 3) < 1e-9   # unformatted scores 0
    assert seen[:2] == ["A red circle.", "A red square."]   # the RM sees the solution, not the thought
    lines = format_table(table).splitlines()
    assert lines[2].rstrip().endswith("0.400")


def test_greedy_eval_decodes_a_repeated_prompt_once(tmp_path, tiny, monkeypatch):
    model, processor = tiny
    a, b = _record(tmp_path, "a", "counting", "3"), _record(tmp_path, "b", "counting", "2")
    Image.new("RGB", (84, 84), (200, 0, 0)).save(b.images[0])     # b: another image, same text
    again = _record(tmp_path, "a2", "counting", "3")                 # a's prompt under another id and file
    assert unique_prompts([a, b, again, b]) == ([0, 1], [0, 1, 0, 1])
    rows, generate = [], model.generate

    def counting_generate(**kw):
        rows.append(kw["input_ids"].shape[0])
        return generate(**kw)

    monkeypatch.setattr(model, "generate", counting_generate)
    out = generate_greedy(model, processor, [a, b, again, b], max_new_tokens=6)
    assert rows == [2] and out[2] == out[0] and out[3] == out[1]
    assert generate_greedy(model, processor, [b], max_new_tokens=6) == [out[1]]


def test_distinct_accuracy_weighs_a_repeated_prompt_once(tmp_path):
    a, b = _record(tmp_path, "a", "counting", "3"), _record(tmp_path, "b", "counting", "2")
    Image.new("RGB", (84, 84), (200, 0, 0)).save(b.images[0])
    copies = [_record(tmp_path, f"a{i}", "counting", "3") for i in range(3)]     # a's prompt three more times
    cap = _record(tmp_path, "c", "caption", None)
    gens = judge([a, *copies, b, cap], ["<think>x</think>3"] * 4 + ["<think>x</think>5", "<think>x</think>hi"])
    assert len({g.prompt for g in gens[:4]}) == 1 and gens[4].prompt != gens[0].prompt
    table = summarize(gens)
    assert table["counting"]["accuracy"] == 4 / 5
    assert table["counting"]["n_distinct"] == 2 and table["counting"]["distinct_accuracy"] == 0.5
    assert table["caption"]["n_distinct"] == 1 and "distinct_accuracy" not in table["caption"]
    lines = format_table(table).splitlines()
    assert "distinct prompts" in lines[0] and lines[2].rstrip().endswith("50.0% of 2")
    no_repeats = summarize(judge([a, b], ["<think>x</think>3", "<think>x</think>5"]))
    assert no_repeats["counting"]["distinct_accuracy"] == 0.5
    assert "distinct" not in format_table(no_repeats)      # the column shows only where prompts repeat
