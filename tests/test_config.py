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
    with pytest.raises(ConfigError, match="probe.families: 'conditional_logit' .* needs prompt.mode=per_choice"):
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
    assert store_identity(cfg)["teacher.dtype"] == resolved.teacher.dtype  # a store never records 'auto'
