import pytest

from engine.config import Config, ConfigError, config_hash, from_dict, load, parse_override, store_identity


def test_defaults_and_shipped_configs_load():
    assert isinstance(from_dict({}), Config)
    for name in ("default", "tiny"):
        cfg = load(f"configs/{name}.yaml")
        assert cfg.prompt.mode == "per_choice"


def test_overrides_are_typed():
    cfg = load("configs/default.yaml", ["student.epochs=3", "extract.layers=[2, 4]", "probe.cs=[0.1,1]", "data.max_test=null"])
    assert cfg.student.epochs == 3
    assert cfg.extract.layers == (2, 4)
    assert cfg.probe.cs == (0.1, 1.0)
    assert cfg.data.max_test is None
    assert load("configs/default.yaml", ["student.lr=3e-4"]).student.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string
    assert parse_override("a.b=x y") == ("a.b", "x y")


@pytest.mark.parametrize(
    "override, message",
    [
        ("student.epoch=1", r"student\.epoch: unknown key\. Valid keys here: .*epochs"),
        ("bogus=1", r"bogus: unknown key"),
        ("student.epochs=x", r"student\.epochs: must be an integer"),
        ("prompt.mode=letters", r"prompt\.mode: must be one of"),
        ("data.train_fraction=0", r"data\.train_fraction: must be in \(0, 1\]"),
        ("prompt.answer_format=A", r"prompt\.answer_format: must contain exactly one of"),
        ("extract.layers=[0]", r"extract\.layers: layers are 1-based"),
        ("student.label_sources=[teacher]", r"student\.label_sources: choose from"),
        ("student=3", r"student: must be a mapping"),
        ("baseline.formats=[A]", r"baseline\.formats: 'A' must contain exactly one of \{letter\} or \{number\}"),
        ("baseline.permutations=-1", r"baseline\.permutations: must be >= 0"),
        ("noequals", r"overrides are key=value"),
        ("student.label_sources=[gold, probe", r"student\.label_sources: cannot read the value '\[gold, probe'"),
        ("baseline.formats={letter", r"baseline\.formats: cannot read the value .*quote it"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load("configs/default.yaml", [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such file"):
        load("configs/nope.yaml")


def test_hash_is_stable_and_sensitive():
    a, b = load("configs/default.yaml"), load("configs/default.yaml")
    assert config_hash(a) == config_hash(b)
    c = load("configs/default.yaml", ["student.epochs=9"])
    assert config_hash(a) != config_hash(c)
    # the store identity ignores what does not change the activations
    assert store_identity(a) == store_identity(c)
    assert store_identity(a) != store_identity(load("configs/default.yaml", ["extract.layers=[3]"]))


def test_probe_families_are_checked():
    assert from_dict({"probe": {"families": ["logreg", "conditional_logit", "mlp"]}}).probe.families[1] == "conditional_logit"
    with pytest.raises(ConfigError, match="probe.families: use some of logreg, conditional_logit, mlp"):
        from_dict({"probe": {"families": ["svm"]}})
    with pytest.raises(ConfigError, match=r"probe\.families: \['conditional_logit'\] .* needs prompt\.mode=per_choice"):
        from_dict({"prompt": {"mode": "letter"}, "probe": {"families": ["conditional_logit"]}})


def test_probe_combine_and_label_pool_are_checked():
    cfg = from_dict({"probe": {"combine": ["ensemble", "concat"], "combine_layers": 2}})
    assert cfg.probe.combine == ("ensemble", "concat") and cfg.probe.combine_layers == 2
    assert from_dict({}).probe.combine == () and from_dict({}).probe.label_pool is False
    with pytest.raises(ConfigError, match="probe.combine: use some of concat, ensemble, each once"):
        from_dict({"probe": {"combine": ["mean"]}})
    with pytest.raises(ConfigError, match="probe.combine: "):
        from_dict({"probe": {"combine": ["concat", "concat"]}})
    with pytest.raises(ConfigError, match="probe.combine_layers: must be >= 2"):
        from_dict({"probe": {"combine_layers": 1}})
    with pytest.raises(ConfigError, match="probe.label_pool: .*set data.train_fraction < 1"):
        from_dict({"probe": {"label_pool": True}})
    pooled = from_dict({"probe": {"label_pool": True}, "data": {"train_fraction": 0.1}})
    assert pooled.probe.label_pool


def test_no_students_and_the_issue_configs_load():
    assert load("configs/default.yaml", ["student.label_sources=[]"]).student.label_sources == ()
    for name in ("arc_easy_letter", "arc_challenge", "arc_challenge_letter"):
        cfg = load(f"configs/{name}.yaml")
        assert cfg.student.label_sources == () and cfg.baseline.permutations == 3 and len(cfg.baseline.formats) == 4


def test_store_identity_covers_the_splits():
    from engine.config import store_identity

    a = store_identity(load("configs/default.yaml"))
    b = store_identity(load("configs/default.yaml", ["data.validation_split=test[:30%]", "data.test_split=test[30%:]"]))
    c = store_identity(load("configs/default.yaml", ["data.split_seed=1"]))
    assert a["data.splits"] != b["data.splits"] and a["data.splits"] != c["data.splits"]


def test_seeds_share_a_store_the_sample_seed_does_not():
    """`seed` is a replicate over one store (the benchmark's seeds); `data.sample_seed` picks its questions."""
    from engine.config import store_identity

    a = store_identity(load("configs/default.yaml"))
    assert a == store_identity(load("configs/default.yaml", ["seed=7"]))
    assert a != store_identity(load("configs/default.yaml", ["data.sample_seed=7"]))


def test_free_page_reporting_is_read_from_the_balloon_features(tmp_path):
    """The machine fact written beside timed figures: a virtio balloon reports free pages when bit 5 of
    its features (VIRTIO_BALLOON_F_REPORTING) is set; the order is read only then."""
    from engine.hardware import free_page_reporting

    assert free_page_reporting(str(tmp_path)) == {"reporting": False, "order": None}  # bare metal: no balloon
    order = tmp_path / "module/page_reporting/parameters/page_reporting_order"
    order.parent.mkdir(parents=True)
    order.write_text("9\n")
    dev = tmp_path / "bus/virtio/drivers/virtio_balloon/virtio0"
    dev.mkdir(parents=True)
    (dev / "features").write_text("0110000" + "0" * 25 + "1" + "0" * 31 + "\n")  # stats, deflate-on-OOM; no reporting
    assert free_page_reporting(str(tmp_path)) == {"reporting": False, "order": None}
    (dev / "features").write_text("0110010" + "0" * 25 + "1" + "0" * 31 + "\n")
    assert free_page_reporting(str(tmp_path)) == {"reporting": True, "order": 9}
    assert set(free_page_reporting()) == {"reporting", "order"}  # this machine's, whatever it is


def test_dtype_auto_is_decided_by_a_checkable_fact():
    from engine.config import from_dict, store_identity
    from engine.hardware import pick_dtype, resolve

    assert pick_dtype("auto", gpu=False, flags={"avx2", "fma"})[0] == "float32"
    assert pick_dtype("auto", gpu=False, flags={"avx2", "avx512_bf16"}) == (
        "bfloat16", "auto: the CPU has native bf16 (avx512_bf16)")
    assert pick_dtype("auto", gpu=False, flags={"amx_bf16"})[0] == "bfloat16"
    assert pick_dtype("auto", gpu=True, flags=set())[0] == "bfloat16"
    assert pick_dtype("float32", gpu=True) == ("float32", "set in the config")
    cfg = from_dict({})
    assert (cfg.teacher.dtype, cfg.baseline.dtype, cfg.student.dtype) == ("auto", "auto", "auto")
    resolved, why = resolve(cfg)
    assert {resolved.teacher.dtype, resolved.student.dtype} <= {"float32", "bfloat16"} and set(why) == {
        "teacher", "baseline", "student"}
    assert resolve(resolved)[0] == resolved  # idempotent
    # Each part's dtype follows where it runs: on GPUs with extract.gpus_per_replica (teacher, and the vLLM
    # actor the pipeline places there) and student.use_gpu, whatever the driver's own node has.
    on_gpus = from_dict({"extract": {"gpus_per_replica": 1}, "student": {"use_gpu": True}})
    assert {c["dtype"] for c in resolve(on_gpus)[1].values()} == {"bfloat16"}
    assert all(c["why"] == "auto: runs on a GPU" for c in resolve(on_gpus)[1].values())
    assert store_identity(cfg)["teacher.dtype"] == resolved.teacher.dtype  # a store never records 'auto'


def test_every_default_has_its_declared_type():
    """A default of another type (0 for a float) would not survive a round trip through YAML: the
    loaded config would differ from the one shown, and so would its hash."""
    import dataclasses
    import typing

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, name = hints[f.name], prefix + f.name
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, name + ".")
            elif tp is float:
                yield name, f.default

    wrong = [(n, d) for n, d in walk(Config) if not isinstance(d, float)]
    assert not wrong, wrong


def test_show_config_output_loads_back_to_the_same_config(tmp_path, capsys):
    from cluster.cli import main

    for name in ("default", "bench", "tiny", "arc_easy_letter"):
        argv = ["show-config", f"configs/{name}.yaml", "student.epochs=2", "data.max_test=null", "probe.cs=[0.1, 1]"]
        assert main(argv) == 0
        shown = capsys.readouterr().out
        cfg = load(f"configs/{name}.yaml", argv[2:])
        assert shown.startswith("# distill show-config ") and f"config hash {config_hash(cfg)}" in shown
        (tmp_path / f"{name}.yaml").write_text(shown)
        again = load(tmp_path / f"{name}.yaml")
        assert again == cfg and config_hash(again) == config_hash(cfg)


def test_a_config_extends_another(tmp_path):
    (tmp_path / "base.yaml").write_text("out_dir: runs/base\nseed: 3\nstudent:\n  epochs: 5\n  lr: 1.0e-4\n"
                                        "probe:\n  cs: [0.1, 1]\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("extends: ../base.yaml\nstudent:\n  epochs: 2\nprobe:\n  cs: [10]\n")
    (tmp_path / "top.yaml").write_text("extends: sub/mid.yaml\nout_dir: runs/top\n")
    cfg = load(tmp_path / "top.yaml", ["seed=4"])
    assert cfg.out_dir == "runs/top" and cfg.seed == 4  # this file, then the override
    assert cfg.student.epochs == 2 and cfg.student.lr == 1e-4  # a section merges key by key
    assert cfg.probe.cs == (10.0,)  # a list is replaced whole
    assert cfg.student.batch_size == from_dict({}).student.batch_size  # unset everywhere: the schema's default

    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: extends itself through .*b\.yaml"):
        load(tmp_path / "a.yaml")
    (tmp_path / "lost.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"lost\.yaml: extends: no such file .*nowhere\.yaml"):
        load(tmp_path / "lost.yaml")
    (tmp_path / "bad.yaml").write_text("student:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML at line \d+, column \d+"):
        load(tmp_path / "bad.yaml")


def test_shipped_configs_extend_the_default_and_say_only_what_differs():
    """Each config in configs/ but the default extends it (directly or through another)."""
    from pathlib import Path

    import yaml

    for path in sorted(Path("configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if path.name != "default.yaml":
            assert "extends" in data, path
        assert isinstance(load(path), Config)


def test_help_lists_every_field_with_its_docstring(capsys):
    from cluster.cli import main
    from engine.config import field_docs

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    docs = field_docs()
    assert len(docs) > 90 and len({d[0] for d in docs}) == len(docs)
    for name, tp, _default, doc in docs:
        assert doc, f"{name} has no docstring"
        assert f"  {name} ({tp}, default " in shown, name
        assert " ".join(doc.split())[:40] in " ".join(shown.split()), name
    assert "student.epochs (int, default 3)" in shown and "data.max_test (int or null, default null)" in shown


def test_help_says_what_each_field_decides(capsys):
    """`--help` names, under each field, the artifacts whose identity it enters (engine.identity)."""
    from cluster.cli import main
    from engine.config import decides_text, field_docs

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    shown = capsys.readouterr().out
    assert decides_text("student.lr") == "decides: the student"
    assert decides_text("student.num_workers") == "decides: no artifact"
    assert decides_text("data.max_test") == "decides: the store (and every artifact made from it)"
    assert decides_text("seed") == "decides: the probe and the baseline (and every artifact made from them)"
    assert "  student.lr (number, default 3e-05)" in shown
    assert shown.count("      decides: ") == len(field_docs())


def test_kernel_isa_records_what_the_kernels_were_limited_to():
    """A timed figure names the kernels' instruction set: torch's own choice, and any limit set in the
    environment (here torch's kernels held to their portable default)."""
    import ast
    import os
    import subprocess
    import sys

    code = "from engine.hardware import kernel_isa; print(kernel_isa())"
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")}
    env["ATEN_CPU_CAPABILITY"] = "default"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert ast.literal_eval(out) == {"torch": "DEFAULT", "ATEN_CPU_CAPABILITY": "default"}
