"""Tasks as YAML specs: nested field paths, every answer form, templates and filters, the built-in specs
(the shared files, the hub layouts, ARC's original JSONL, and others), bad specs and bad rows failing
with one error that names the spec's field, the file and the row; stores of the four datasets keep
their identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from engine.config import ConfigError, DataConfig, config_hash, load, store_identity
from engine.tasks import DataError, load_role, load_split
from engine.taskspec import SpecError, builtin_specs, load_spec, map_row, resolve

REPO = Path(__file__).resolve().parents[1]

ARC_ORIGINAL = {"id": "Mercury_7175875", "question": {"stem": "Which is a planet?", "choices": [
    {"text": "Moon", "label": "A"}, {"text": "Sun", "label": "B"}, {"text": "Mars", "label": "C"},
    {"text": "Comet", "label": "D"}]}, "answerKey": "C"}


def write_spec(tmp_path: Path, **keys) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps({"task": "mine", **keys}))  # JSON is YAML
    return str(path)


def write_rows(folder: Path, split: str, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_field_paths_reach_into_nested_rows():
    assert resolve(ARC_ORIGINAL, "question.stem") == "Which is a planet?"
    assert resolve(ARC_ORIGINAL, "question.choices[].text") == ["Moon", "Sun", "Mars", "Comet"]
    assert resolve(ARC_ORIGINAL, "question.choices[2].label") == "C"
    assert resolve({"a": {"b": [[1, 2], [3]]}}, "a.b[][0]") == [1, 3]
    with pytest.raises(KeyError, match=r"question\.body is missing"):
        resolve(ARC_ORIGINAL, "question.body")
    with pytest.raises(KeyError, match="not a field path"):
        resolve(ARC_ORIGINAL, "question..stem")


def test_original_arc_jsonl_runs_by_spec(tmp_path):
    rows = [ARC_ORIGINAL, {**ARC_ORIGINAL, "id": "q2", "answerKey": "A"},
            {"id": "q3", "question": {"stem": "Pick three.", "choices": [{"text": t, "label": str(i + 1)} for i, t in
                                                                          enumerate(["one", "two", "three"])]},
             "answerKey": "3"}]
    folder = write_rows(tmp_path / "arc", "train", rows)
    examples = load_split(DataConfig(source=str(folder), task="arc_original"), "train")
    assert [(ex.id, ex.question, ex.choices, ex.answer) for ex in examples] == [
        ("Mercury_7175875", "Which is a planet?", ("Moon", "Sun", "Mars", "Comet"), 2),
        ("q2", "Which is a planet?", ("Moon", "Sun", "Mars", "Comet"), 0),
        ("q3", "Pick three.", ("one", "two", "three"), 2)]
    # Without the spec the same file is refused, pointing at data.task.
    with pytest.raises(DataError, match=r"train\.jsonl:1: field 'choices': missing; .*set data\.task .*arc_original"):
        load_split(DataConfig(source=str(folder)), "train")


@pytest.mark.parametrize("answer, answer_type, extra, want", [
    ("gold", "index", {}, 2),                                   # an int field
    ("{{ gold_1based | int - 1 }}", "index", {}, 1),            # a template rendering digits
    ("key", "label", {}, 3),                                    # A, B, C, D by default
    ("key2", "label", {"labels": "labels"}, 1),                 # the row's own labels
    ("right", "text", {}, 0),                                   # the answer's text
])
def test_every_answer_form(answer, answer_type, extra, want):
    spec_keys = {"task": "t", "question": "q", "choices": "opts", "answer": answer, "answer_type": answer_type, **extra}
    from engine.taskspec import TaskSpec

    row = {"q": "Which?", "opts": ["w", "x", "y", "z"], "gold": 2, "gold_1based": "2", "key": "D", "key2": "ii",
           "labels": ["i", "ii", "iii", "iv"], "right": " w "}
    assert map_row(TaskSpec(**spec_keys), row, "train", 1)["answer"] == want


def test_templates_lists_of_fields_filters_and_default_ids(tmp_path):
    spec = write_spec(tmp_path, question="{{ context }} {{ question }}", choices=["answerA", "answerB", "answerC"],
                      answer="{{ label | int - 1 }}", filter="{{ keep }}", subject="{{ topic | upper }}")
    rows = [{"context": "Sam ate.", "question": "Why?", "answerA": "hungry", "answerB": "bored", "answerC": "sad",
             "label": "1", "keep": True, "topic": "food"},
            {"context": "Dropped.", "question": "x", "answerA": "a", "answerB": "b", "answerC": "c", "label": "2",
             "keep": False, "topic": "x"},
            {"context": "Kim ran.", "question": "Why?", "answerA": "late", "answerB": "cold", "answerC": "fun",
             "label": "3", "keep": True, "topic": "sport"}]
    folder = write_rows(tmp_path / "siqa", "validation", rows)
    got = load_split(DataConfig(source=str(folder), task=spec), "validation")
    assert [(ex.id, ex.question, ex.answer, ex.subject) for ex in got] == [
        ("mine/validation/1", "Sam ate. Why?", 0, "FOOD"), ("mine/validation/3", "Kim ran. Why?", 2, "SPORT")]
    csv = tmp_path / "csvdata"
    csv.mkdir()
    (csv / "test.csv").write_text("q,a,b,gold\nOne?,yes,no,1\nTwo?,up,down,0\n")
    spec = write_spec(tmp_path, question="q", choices="{{ [a, b] }}", answer="{{ gold }}")
    got = load_split(DataConfig(source=str(csv), task=spec), "test")
    assert [(ex.question, ex.choices, ex.answer) for ex in got] == [("One?", ("yes", "no"), 1), ("Two?", ("up", "down"), 0)]


@pytest.mark.parametrize("keys, row, pattern", [
    ({"question": "stem", "choices": "opts", "answer": "gold"}, {"opts": ["a", "b"], "gold": 0},
     r"train\.jsonl:2: field 'question' of task spec mine \(.*spec\.yaml, question: 'stem'\): field path 'stem': stem "
     r"is missing; fix the row, or the spec's question"),
    ({"question": "stem", "choices": "opts", "answer": "key", "answer_type": "label"},
     {"stem": "Q?", "opts": ["a", "b"], "key": "E"},
     r"train\.jsonl:2: field 'answer' of task spec mine .*label 'E' is not among the choices' labels \['A', 'B'\]"),
    ({"question": "stem", "choices": "opts", "answer": "gold"}, {"stem": "Q?", "opts": [], "gold": 0},
     r"train\.jsonl:2: field 'choices' of task spec mine .*'opts' gives an empty list of choices"),
    ({"question": "{{ stem | trim }}", "choices": "opts", "answer": "gold"}, {"stem": "   ", "opts": ["a", "b"], "gold": 0},
     r"train\.jsonl:2: field 'question' of task spec mine .*'\{\{ stem \| trim \}\}' renders empty"),
    ({"question": "stem", "choices": "opts", "answer": "gold"}, {"stem": "Q?", "opts": ["a", "b"], "gold": "1"},
     r"train\.jsonl:2: field 'answer' of task spec mine .*'1' \(str\), not a 0-based int index"),
])
def test_bad_rows_name_the_spec_field_the_file_and_the_row(tmp_path, keys, row, pattern, capsys):
    spec = write_spec(tmp_path, **keys)
    good = {"stem": "Fine?", "opts": ["a", "b"], "gold": 0, "key": "A"}
    folder = write_rows(tmp_path / "data", "train", [good, row])
    with pytest.raises(DataError, match=pattern):
        load_split(DataConfig(source=str(folder), task=spec), "train")
    # through the CLI: one line, and nothing written
    out = tmp_path / "run"
    assert main(["extract", "configs/tiny.yaml", f"data.source={folder}", f"data.task={spec}", f"out_dir={out}",
                 "data.validation_split=train[:50%]", "data.test_split=train[50%:]"]) == 2
    err = capsys.readouterr().err
    assert err.count("distill: error:") == 1 and "Traceback" not in err, err
    assert not (out / "activations.zarr").exists() and not (out / "activations.zarr.partial").exists()


def test_bad_specs_fail_at_config_load(tmp_path):
    with pytest.raises(SpecError, match=r"unknown key 'doc_to_text'; a spec's keys are"):
        load_spec(write_spec(tmp_path, question="q", choices="c", answer="a", doc_to_text="x"))
    with pytest.raises(SpecError, match=r"key 'answer' is missing"):
        load_spec(write_spec(tmp_path, question="q", choices="c"))
    with pytest.raises(SpecError, match=r"answer_type: must be one of"):
        load_spec(write_spec(tmp_path, question="q", choices="c", answer="a", answer_type="letter"))
    with pytest.raises(ConfigError, match=r"data\.task: 'nope' is neither a built-in task spec .*distill tasks"):
        load(REPO / "configs/tiny.yaml", ["data.task=nope"])


def test_built_in_specs_and_their_roles(capsys):
    names = set(builtin_specs())
    assert {"shared", "arc_easy", "arc_challenge", "mmlu", "aqua_rat", "arc_original"} <= names
    assert len(names - {"shared", "arc_easy", "arc_challenge", "mmlu", "aqua_rat", "arc_original"}) >= 3
    for name in names:
        spec = load_spec(name)
        assert spec.task == name and spec.description
    assert DataConfig(task="mmlu", source="cais/mmlu").train_split == "validation"  # the spec's honest roles
    assert DataConfig(task="mmlu", source="cais/mmlu", test_split="test[:10%]").test_split == "test[:10%]"
    assert main(["tasks"]) == 0
    listed = capsys.readouterr().out
    assert all(f"\n{n} " in "\n" + listed for n in names), listed


@pytest.mark.parametrize("dataset", ["arc_easy", "arc_challenge", "mmlu", "aqua_rat"])
def test_the_shared_files_read_the_same_through_the_shared_spec(shared_data, dataset):
    data = DataConfig(dataset=dataset, source=str(shared_data / dataset), max_test=300)
    assert load_role(data, "test") == load_role(DataConfig(**{**data.__dict__, "task": "shared"}), "test")


def test_stores_of_the_four_datasets_keep_their_identity():
    """The identities (hence the stores) made before task specs existed: these hashes were computed by the
    code with the adapters (commit df4fcb9), teacher.dtype pinned so the machine's bf16 support can't enter."""
    from cluster.bench import dataset_config

    before = {"configs/default.yaml": "8e5f26ab08af5313", "configs/arc_challenge.yaml": "bd0dab34fe211418",
              "arc_easy": "912b232d07c7b6db", "arc_challenge": "e6821c6322c44fe2", "mmlu": "15c8dfcf5eb684fd",
              "aqua_rat": "0b520d45078dee4b"}
    now = {name: config_hash(store_identity(load(REPO / name, ["teacher.dtype=float32"])))
           for name in ("configs/default.yaml", "configs/arc_challenge.yaml")}
    bench = load(REPO / "configs/bench.yaml", ["teacher.dtype=float32"])
    now |= {ds: config_hash(store_identity(dataset_config(bench, ds))) for ds in bench.bench.datasets}
    assert now == before


@pytest.mark.slow
def test_a_task_never_seen_runs_from_a_spec_alone(tmp_path, shared_data, tiny_model):
    """OpenBookQA's hub layout (question_stem, choices {text, label}, answerKey), none of the shared
    schema's field names, through `distill run` with nothing but data.task=openbookqa."""
    from conftest import distill

    folder = tmp_path / "obqa"
    for split, n in (("train", 40), ("validation", 20), ("test", 24)):
        rows = [json.loads(line) for line in (shared_data / "arc_easy" / f"{split}.jsonl").read_text().splitlines()[:n]]
        write_rows(folder, split, [{"id": f"obqa-{r['id']}", "question_stem": r["question"],
                                    "choices": {"text": r["choices"], "label": list("ABCDE"[: len(r["choices"])])},
                                    "answerKey": "ABCDE"[r["answer"]]} for r in rows])
    out = tmp_path / "run"
    res = distill("run", "configs/tiny.yaml", f"teacher.model={tiny_model}", f"out_dir={out}", "data.task=openbookqa",
                  f"data.source={folder}", "data.dataset=openbookqa", "baseline.enabled=false",
                  "student.label_sources=[gold, probe]")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "openbookqa" and report["splits"]["test"] == 24
    assert [s["source"] for s in report["students"]] == ["gold", "probe"]
    import zarr

    root = zarr.open_group(str(out / "activations.zarr"), mode="r")
    assert root.attrs["identity"]["data.task"] == "openbookqa"
    assert str(root["test"]["ids"][0]).startswith("obqa-")
