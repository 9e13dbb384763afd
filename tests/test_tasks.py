"""Loading, mapping (task specs), validating and subsetting multiple-choice tasks. Offline: hub rows are hand-written."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from engine.config import DataConfig
from engine.tasks import (
    DataError,
    Example,
    _mapped,
    load_role,
    load_split,
    select_train,
    stratified_subset,
)
from engine.taskspec import load_spec, map_row

GOOD = {"id": "q1", "question": "What is 1+1?", "choices": ["1", "2", "3"], "answer": 1, "subject": None}


def write_jsonl(folder: Path, split: str, rows: list) -> Path:
    """Write rows (dicts, or raw strings written as-is) one per line to folder/<split>.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path = folder / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def local(folder: Path, **kw) -> DataConfig:
    return DataConfig(dataset="test", source=str(folder), **kw)


# ---------------------------------------------------------------------------------------------
# The shared data


@pytest.mark.parametrize(
    "dataset, split, n",
    [("arc_easy", "train", 2251), ("arc_easy", "validation", 570), ("arc_easy", "test", 2376),
     ("arc_challenge", "test", 1172), ("mmlu", "validation", 1531), ("aqua_rat", "test", 254)],
)
def test_shared_data_sizes(shared_data, dataset, split, n):
    examples = load_split(DataConfig(dataset=dataset, source=str(shared_data / dataset)), split)
    assert len(examples) == n
    assert all(isinstance(ex, Example) and 0 <= ex.answer < len(ex.choices) for ex in examples)
    assert len({ex.id for ex in examples}) == n


def test_shared_mmlu_subject_and_aqua_choices(shared_data):
    mmlu = load_split(DataConfig(dataset="mmlu", source=str(shared_data / "mmlu")), "validation")
    assert all(isinstance(ex.subject, str) and ex.subject for ex in mmlu)
    assert len({ex.subject for ex in mmlu}) == 57
    aqua = load_split(DataConfig(dataset="aqua_rat", source=str(shared_data / "aqua_rat")), "test")
    assert all(len(ex.choices) == 5 for ex in aqua)


# ---------------------------------------------------------------------------------------------
# Hub adapters on hand-written hub-shaped rows

ARC_LETTERS = {"id": "Mercury_7175875", "question": "Which is a planet?",
               "choices": {"text": ["Moon", "Sun", "Mars", "Comet"], "label": ["A", "B", "C", "D"]},
               "answerKey": "C"}
ARC_NUMBERS = {"id": "NYSEDREGENTS_2006_8_10", "question": "Pick three.",
               "choices": {"text": ["one", "two", "three", "four"], "label": ["1", "2", "3", "4"]},
               "answerKey": "3"}
MMLU_ROW = {"question": "Order of Z_4?", "subject": "abstract_algebra", "choices": ["1", "2", "3", "4"],
            "answer": 3}
AQUA_ROW = {"question": "x + 1 = 23; x?", "options": ["A)21", "B)21.5", "C)22", "D)22.5", "E)23"],
            "rationale": "23 - 1 = 22", "correct": "C"}


def mapped(task: str, row: dict, index: int, split: str) -> dict:
    """One hub row through a built-in spec, as load_split maps it (`index` 0-based)."""
    return map_row(load_spec(task), row, split, index + 1)


def test_arc_hub_spec_reads_letter_and_numeric_labels():
    row = mapped("arc_easy", ARC_LETTERS, 0, "test")
    assert row["id"] == "Mercury_7175875" and row["choices"] == ["Moon", "Sun", "Mars", "Comet"]
    assert row["answer"] == 2 and row["subject"] is None
    assert mapped("arc_challenge", ARC_NUMBERS, 5, "train")["answer"] == 2


def test_mmlu_and_aqua_hub_specs_keep_the_shared_ids():
    row = mapped("mmlu", MMLU_ROW, 7, "validation")
    assert row == {"id": "abstract_algebra/validation/7", "question": "Order of Z_4?",
                   "choices": ["1", "2", "3", "4"], "answer": 3, "subject": "abstract_algebra"}
    row = mapped("aqua_rat", AQUA_ROW, 3, "test")
    assert row["id"] == "aqua_rat/test/3" and row["answer"] == 2
    assert row["choices"] == ["21", "21.5", "22", "22.5", "23"]


def test_hub_spec_errors_name_the_spec_field_and_row():
    spec = load_spec("arc_easy")
    with pytest.raises(DataError, match=r"row 2: field 'answer' of task spec arc_easy \(.*arc_easy\.yaml, answer: "
                                        r"'answerKey'\): label 'E' is not among the choices' labels \['A', 'B', 'C', 'D'\]"):
        _mapped(spec, [("row 1", ARC_LETTERS), ("row 2", {**ARC_LETTERS, "answerKey": "E"})], "train")
    with pytest.raises(DataError, match=r"field 'answer' of task spec aqua_rat"):
        _mapped(load_spec("aqua_rat"), [("row 1", {**AQUA_ROW, "correct": "F"})], "test")
    with pytest.raises(DataError, match=r"row 1: field 'subject' of task spec mmlu .*subject is missing; fix the row"):
        _mapped(load_spec("mmlu"), [("row 1", {k: v for k, v in MMLU_ROW.items() if k != "subject"})], "test")


def test_hub_ids_find_their_built_in_spec():
    from engine.tasks import task_spec

    assert task_spec(DataConfig(dataset="arc_challenge", source="allenai/ai2_arc")).task == "arc_challenge"
    assert task_spec(DataConfig(dataset="anything", source="cais/mmlu")).task == "mmlu"
    assert task_spec(DataConfig(dataset="aqua_rat", source="deepmind/aqua_rat")).task == "aqua_rat"
    with pytest.raises(DataError, match=r"no built-in task spec reads hub id 'rajpurkar/squad'.*set data\.task"):
        task_spec(DataConfig(dataset="squad", source="rajpurkar/squad"))


def test_hub_path_maps_rows(monkeypatch):
    """load_split on a hub id, with datasets.load_dataset faked to serve hand-written hub rows."""
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([ARC_LETTERS, ARC_NUMBERS])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_split(DataConfig(dataset="arc_easy", source="allenai/ai2_arc", limit=1), "train")
    assert calls == [("allenai/ai2_arc", "ARC-Easy", "train")]
    assert examples == [Example("Mercury_7175875", "Which is a planet?", ("Moon", "Sun", "Mars", "Comet"), 2)]


# ---------------------------------------------------------------------------------------------
# Local files: parquet, limit, bad input


def test_parquet_via_datasets(tmp_path):
    rows = [{**GOOD, "id": f"q{i}", "answer": i % 3, "subject": "math"} for i in range(5)]
    folder = tmp_path / "pq"
    folder.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "validation.parquet"))
    examples = load_split(local(folder), "validation")
    assert [ex.id for ex in examples] == [f"q{i}" for i in range(5)]
    assert examples[4] == Example("q4", "What is 1+1?", ("1", "2", "3"), 1, "math")
    assert sorted(p.name for p in folder.iterdir()) == ["validation.parquet"]


def test_limit_keeps_first_rows(tmp_path):
    write_jsonl(tmp_path, "train", [{**GOOD, "id": f"q{i}"} for i in range(10)])
    assert [ex.id for ex in load_split(local(tmp_path, limit=3), "train")] == ["q0", "q1", "q2"]
    assert len(load_split(local(tmp_path, limit=50), "train")) == 10


@pytest.mark.parametrize(
    "bad_row, pattern",
    [
        ('{"id": "q9", "question": "broken",', r"train\.jsonl:3: not valid JSON"),
        ({k: v for k, v in GOOD.items() if k != "question"}, r"train\.jsonl:3: field 'question': missing; .*shared schema"),
        ({**GOOD, "answer": 5}, r"train\.jsonl:3: field 'answer': 5 is out of range for 3 choices"),
        ({**GOOD, "answer": "B"}, r"train\.jsonl:3: field 'answer': 'B' \(str\) is not an integer"),
        ({**GOOD, "answer": True}, r"train\.jsonl:3: field 'answer': True \(bool\)"),
        ({**GOOD, "choices": "1, 2, 3"}, r"train\.jsonl:3: field 'choices': .* is not a list"),
        ({**GOOD, "choices": ["only"], "answer": 0}, r"train\.jsonl:3: field 'choices': has 1 choice"),
        ({**GOOD, "id": "q0"}, r"train\.jsonl:3: field 'id': 'q0' is already used at .*train\.jsonl:1"),
        ({**GOOD, "id": ""}, r"train\.jsonl:3: field 'id'"),
        ({**GOOD, "subject": 3}, r"train\.jsonl:3: field 'subject'"),
        (ARC_LETTERS, r"train\.jsonl:3: field 'answer': missing; local files must be in the shared schema"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, bad_row, pattern):
    write_jsonl(tmp_path, "train", [{**GOOD, "id": "q0"}, {**GOOD, "id": "q1"}, bad_row, {**GOOD, "id": "q3"}])
    with pytest.raises(DataError, match=pattern):
        load_split(local(tmp_path), "train")


def test_missing_split_file(tmp_path):
    write_jsonl(tmp_path, "train", [GOOD])
    with pytest.raises(DataError, match=r"no file for split 'dev'.*files there: train\.jsonl.*data\.train_split"):
        load_split(local(tmp_path), "dev")


def test_missing_local_folder_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match=r"data\.source: .* does not exist"):
        load_split(local(tmp_path / "nope"), "train")


# ---------------------------------------------------------------------------------------------
# Stratified subsets

ANSWERS = np.array([0] * 400 + [1] * 300 + [2] * 200 + [3] * 97 + [4] * 3)


def test_stratified_size_and_proportions():
    idx = stratified_subset(ANSWERS, 0.1, seed=0)
    assert len(idx) == 100 and np.all(np.diff(idx) > 0) and idx.dtype.kind == "i"
    counts = np.bincount(ANSWERS[idx], minlength=5)
    assert np.all(np.abs(counts[:4] - 0.1 * np.bincount(ANSWERS)[:4]) <= 1)
    assert counts[4] == 1  # every present class keeps a row
    assert len(stratified_subset(ANSWERS, 0.001, seed=0)) == 5


def test_stratified_determinism_nesting_and_full():
    a = stratified_subset(ANSWERS, 0.2, seed=3)
    assert np.array_equal(a, stratified_subset(ANSWERS, 0.2, seed=3))
    assert not np.array_equal(a, stratified_subset(ANSWERS, 0.2, seed=4))
    for small, big in [(0.01, 0.05), (0.05, 0.2), (0.2, 0.7)]:
        assert set(stratified_subset(ANSWERS, small, 3)) <= set(stratified_subset(ANSWERS, big, 3))
    assert np.array_equal(stratified_subset(ANSWERS, 1.0, seed=3), np.arange(len(ANSWERS)))


def test_select_train():
    examples = [Example(f"q{i}", "q?", ("a", "b"), int(i % 2)) for i in range(40)]
    assert select_train(examples, DataConfig(train_fraction=1.0), seed=0) == examples
    kept = select_train(examples, DataConfig(train_fraction=0.25), seed=0)
    assert len(kept) == 10 and sum(ex.answer for ex in kept) == 5


def test_split_specs_parse_and_refuse():
    from engine.config import ConfigError, parse_split

    assert parse_split("test") == ("test", 0.0, 1.0)
    assert parse_split("test[:30%]") == ("test", 0.0, 0.3)
    assert parse_split("validation[12.5%:]") == ("validation", 0.125, 1.0)
    for bad in ("test[30%]", "test[:30]", "test[60%:40%]", "test[:120%]", ""):
        with pytest.raises(ConfigError, match="data.split"):
            parse_split(bad)
    with pytest.raises(ConfigError, match=r"data\.test_split: 'test\[40%:\]' shares questions with data\.validation_split"):
        DataConfig(validation_split="test[:50%]", test_split="test[40%:]")
    with pytest.raises(ConfigError, match=r"data\.test_split: 'validation' shares questions with data\.validation_split"):
        DataConfig(test_split="validation")
    DataConfig(train_split="validation", validation_split="test[:30%]", test_split="test[30%:]")


def test_carved_roles_share_no_question_and_cover_the_split(shared_data):
    """AQuA-RAT has validation and test only: train on validation, pick on 30% of test, report on the rest."""
    data = DataConfig(dataset="aqua_rat", source=str(shared_data / "aqua_rat"), train_split="validation",
                      validation_split="test[:30%]", test_split="test[30%:]")
    roles = {r: load_role(data, r) for r in ("train", "validation", "test")}
    ids = {r: {ex.id for ex in exs} for r, exs in roles.items()}
    assert len(ids["validation"]) == 76 and len(ids["test"]) == 178 and len(ids["train"]) == 254
    assert not ids["validation"] & ids["test"] and not ids["train"] & (ids["validation"] | ids["test"])
    whole = load_split(data, "test")
    assert ids["validation"] | ids["test"] == {ex.id for ex in whole}
    order = [ex.id for ex in whole]
    assert [order.index(x.id) for x in roles["test"]] == sorted(order.index(x.id) for x in roles["test"])  # file order
    # the cut depends on split_seed, not on the run's seed or the sample seed
    resampled = DataConfig(**{**data.__dict__, "sample_seed": 5})
    assert [ex.id for ex in load_role(resampled, "test")] == [ex.id for ex in roles["test"]]
    other = DataConfig(**{**data.__dict__, "split_seed": 1})
    assert {ex.id for ex in load_role(other, "test")} != ids["test"]
