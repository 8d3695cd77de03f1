"""The suite's multi-image, puzzle and instruction tasks, on the suite's board (`synth.suite`).

  spot_difference  two boards, one cell changed (a shape added, removed or recoloured; the colour
                   that comes or goes is on no other shape): "Which cell differs ...?" answer "row 2, column 3"
                   (the thought reads the boards cell by cell: "First: red - - ... Second: - = = ...")
  puzzle           every row the same sequence of three shapes, the last cell empty:
                   "Which shape completes the row pattern? A. ... D. ..."             answer "a red square"
                   (the option's text; the letter scores too)
  instruction      "Describe the board in at most 5 words, naming the colours."       checked by rules
                   (`meta.rules`: at most N words, every colour on the board named, no other colour)

`meta.boards` holds the objects of each image, in order.
"""
from __future__ import annotations

import random
import string

from PIL import Image

from synth.suite import COLORS, SHAPES, SceneSpec, describe, draw_scene, object_box, random_objects

BOARD_TASKS = ("spot_difference", "puzzle", "instruction")
CHANGES = ("color", "add", "remove")


def _cell_name(cell: int, spec: SceneSpec) -> str:
    row, col = divmod(cell, spec.grid)
    return f"row {row + 1}, column {col + 1}"


def _obj(cell: int, shape: str, color: str, spec: SceneSpec) -> dict:
    return {"cell": cell, "shape": shape, "color": color, "box": object_box(cell, spec)}


def read_cells(board: list[dict], spec: SceneSpec) -> list[str]:
    """The colour in each cell of a board in reading order, "-" for an empty cell."""
    at = {o["cell"]: o["color"] for o in board}
    return [at.get(cell, "-") for cell in range(spec.grid * spec.grid)]


def spot_difference(rng: random.Random, spec: SceneSpec) -> tuple[list[list[dict]], str, str, str]:
    """(boards, question, thought, answer): the second board is the first with one cell changed. The
    colour that appears or disappears is on no other shape.

    The thought reads the first board cell by cell (one word a cell, its colour or "-"), then the
    second against it: "=" for a cell as on the first board, else what the second board holds there:
    "First: red - - - blue - - - -. Second: - = = = = = = = =." Each word reads one vision token and
    compares it with the word written for that cell on the first board, so the answer is the cell of
    the one word that is not "=". (A thought that listed each board's colours and then grounded the
    one that changed stayed at chance: docs/results.md.) 35 tokens with the answer, within the
    demo's rollout max_tokens."""
    change = rng.choice(CHANGES)
    first = random_objects(rng, rng.randint(1, 2) if change == "add" else rng.randint(2, 3), spec, distinct_colors=True)
    second = [dict(o) for o in first]
    unused = [c for c in COLORS if c not in {o["color"] for o in first}]
    if change == "add":
        cell = rng.choice(sorted(set(range(spec.grid * spec.grid)) - {o["cell"] for o in first}))
        changed = _obj(cell, rng.choice(SHAPES), rng.choice(unused), spec)
        second = sorted(second + [changed], key=lambda o: o["cell"])
    else:
        i = rng.randrange(len(second))
        changed = second[i]
        if change == "remove":
            second.pop(i)
        else:
            second[i] = {**changed, "color": rng.choice(unused)}
    answer = _cell_name(changed["cell"], spec)
    before, after = read_cells(first, spec), read_cells(second, spec)
    marks = ["=" if a == b else b for a, b in zip(before, after)]
    thought = f"First: {' '.join(before)}. Second: {' '.join(marks)}."
    question = "Which cell differs between the two boards? Give its row and column."
    return [first, second], question, thought, answer


def puzzle(rng: random.Random, spec: SceneSpec) -> tuple[list[list[dict]], str, str, str, list[str]]:
    """(boards, question, thought, answer, options): every row the same sequence of three different
    shapes, the last cell left empty. Four options: the missing shape, another shape of the
    sequence, and two shapes not on the board. The answer is the option's text."""
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    sequence = rng.sample(kinds, spec.grid)
    n = spec.grid * spec.grid
    board = [_obj(cell, sequence[cell % spec.grid][1], sequence[cell % spec.grid][0], spec) for cell in range(n - 1)]
    names = [f"a {c} {s}" for c, s in sequence]
    absent = [f"a {c} {s}" for c, s in kinds if (c, s) not in sequence]
    options = [names[-1], rng.choice(names[:-1]), *rng.sample(absent, 2)]
    rng.shuffle(options)
    listed = " ".join(f"{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(options))
    question = f"Which shape completes the row pattern? {listed}."
    thought = f"The last row lacks {names[-1]}."
    return [board], question, thought, names[-1], options


def instruction(rng: random.Random, spec: SceneSpec) -> tuple[list[list[dict]], str, str, str, dict]:
    """(boards, question, thought, solution, rules): describe the board within a word limit, naming
    its colours. With room for two words a shape the solution lists colour and shape ("Red square,
    blue circle."), else the colours alone ("Red, blue.")."""
    objs = random_objects(rng, rng.randint(1, 3), spec)
    present = list(dict.fromkeys(o["color"] for o in objs))
    limit = rng.randint(len(present), 2 * len(objs) + 1)
    words = [f"{o['color']} {o['shape']}" for o in objs] if limit >= 2 * len(objs) else present
    text = ", ".join(words) + "."
    solution = text[0].upper() + text[1:]
    question = f"Describe the board in at most {limit} words, naming the colours."
    rules = {"max_words": limit, "required": present, "forbidden": [c for c in COLORS if c not in present]}
    thought = describe(objs)
    return [objs], question, thought, solution, rules


def make_board_example(task: str, rng: random.Random, spec: SceneSpec) -> dict:
    """One record of a board task without id/images: task, messages, answer, meta (boards, ...)."""
    meta: dict = {"difficulty": None}
    if task == "spot_difference":
        boards, question, thought, answer = spot_difference(rng, spec)
        solution = answer
    elif task == "puzzle":
        boards, question, thought, answer, meta["options"] = puzzle(rng, spec)
        solution = answer
    elif task == "instruction":
        boards, question, thought, solution, meta["rules"] = instruction(rng, spec)
        answer = solution   # a reference; the rules decide
    else:
        raise ValueError(f"unknown board task {task!r}; choose from {BOARD_TASKS}")
    meta["boards"] = boards
    messages = [{"role": "user", "content": [{"type": "image"}] * len(boards) + [{"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"<think>{thought}</think>{solution}"}]}]
    return {"task": task, "messages": messages, "answer": answer, "meta": meta}


def board_key(rec: dict) -> list:
    """What makes two board examples the same item (with the task and the question)."""
    return [[(o["cell"], o["shape"], o["color"]) for o in board] for board in rec["meta"]["boards"]]


def draw_boards(rec: dict, spec: SceneSpec) -> list[Image.Image]:
    return [draw_scene(board, spec) for board in rec["meta"]["boards"]]
