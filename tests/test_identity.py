"""Artifact identities: the config fields that decide a store, a probe sweep, a baseline and a student.

The golden hashes below were computed by the hand-written identities (engine.config.store_identity and
cluster.pipeline's _probe_identity, _baseline_identity, _student_identity at commit f8a8fe5) before the
identities were derived from the fields' metadata (engine/identity.py): they name existing artifact
folders and are checked against existing stores, so they must never change. Never regenerate them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.config import STUDENT_RUNTIME, Config, ConfigError, StudentConfig, config_hash, field_docs, load, store_identity
from engine.identity import (
    ARTIFACTS,
    check_declared,
    decides,
    decides_nothing,
    deciding_fields,
    fields_identity,
    identity,
    runtime,
    section,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
VARIANTS = {
    "plain": [],
    "fewshot": ["prompt.fewshot=2"],
    "fewshot_from": ["prompt.fewshot=2", "prompt.fewshot_split=validation", "prompt.fewshot_seed=4"],
    "fewshot_from_unused": ["prompt.fewshot_split=validation", "prompt.fewshot_seed=4"],
    "prompt_template": ['prompt.template="Q {{ question }} A"'],
    "chat": ["prompt.chat_template=true"],
    "task": ["data.task=arc_easy"],
    "task_empty": ["data.task="],
    "tokens": ["prompt.normalise=tokens"],
    "bytes": ["prompt.normalise=bytes"],
    "letter": ["prompt.mode=letter", "prompt.normalise=none", "probe.families=[logreg]"],
    "letter_no_formats": ["prompt.mode=letter", "prompt.normalise=none", "probe.families=[logreg]",
                          "baseline.formats=[]"],
    "letter_no_baseline": ["prompt.mode=letter", "prompt.normalise=none", "probe.families=[logreg]",
                           "baseline.enabled=false", "extract.teacher_scores=true"],
    "student_template": ['student.template="{{ question }}"'],
    "max_failures": ["student.max_failures=5"],
    "workers": ["student.num_workers=2", "student.cpus_per_worker=4", "student.use_gpu=true"],
    "fraction": ["data.train_fraction=0.1"],
    "pool": ["data.train_fraction=0.1", "probe.label_pool=true", "student.label_sources=[gold, probe_pseudo]"],
    "seed": ["seed=3"],
    "runtime": ["ray.num_cpus=4", "out_dir=elsewhere", "bench.seeds=[0]", "extract.batch_size=7",
                "extract.replicas=3", "extract.cpus_per_replica=1", "extract.placement=SPREAD",
                "extract.max_chunk_retries=0", "baseline.kv_cache_gb=3", "baseline.gpu_memory_utilization=0.5",
                "baseline.tensor_parallel_size=2"],
    "splits": ["data.split_seed=1", "data.validation_split=test[:30%]", "data.test_split=test[30%:]"],
    "head": ["student.finetune=head", "student.head_epochs=5"],
    "bf16": ["teacher.dtype=bfloat16"],
    "gpu_auto": ["teacher.dtype=auto", "extract.gpus_per_replica=1"],
    "baseline_fields": ["baseline.max_questions=10", "baseline.dtype=float16", "baseline.permutations=1"],
    "limit": ["data.limit=50", "extract.chunk_rows=64", "extract.layers=[1, 2]"],
    "probe_fields": ["probe.cs=[0.1, 1.0]", "probe.folds=3", "probe.combine=[]"],
    "student_fields": ["student.lr=0.001", "student.epochs=5", "student.dtype=float32", "student.soft=false"],
    "teacher_misc": ["teacher.revision=main", "teacher.trust_remote_code=true", "teacher.cache_dir=/x"],
}


def cases() -> dict[str, object]:
    """name -> config: every config file under every variant it accepts (teacher.dtype pinned to float32
    unless the variant sets it, so the machine's bf16 support cannot enter), and the benchmark's datasets."""
    from cluster.bench import cell_config, dataset_config

    out = {}
    for name in CONFIGS:
        for variant, overrides in VARIANTS.items():
            try:
                out[f"{name}:{variant}"] = load(REPO / "configs" / name, ["teacher.dtype=float32", *overrides])
            except ConfigError:
                pass
    bench = load(REPO / "configs" / "bench.yaml", ["teacher.dtype=float32"])
    for ds in bench.bench.datasets:
        out[f"bench:{ds}"] = dataset_config(bench, ds)
        out[f"bench:{ds}:cell"] = cell_config(dataset_config(bench, ds), 2, 0.25)
        out[f"bench:{ds}:slice"] = cell_config(dataset_config(bench, ds), 1, 1.0, finetune="full",
                                               sources=("gold", "probe"))
    return out


def identity_hashes(cfg) -> dict[str, str]:
    out = {"store": config_hash(identity(cfg, "store")), "probe": config_hash(identity(cfg, "probe")),
           "baseline": config_hash(identity(cfg, "baseline"))}
    for source in sorted({"gold", *cfg.student.label_sources}):
        out[f"student:{source}"] = config_hash(identity(cfg, "student", source))
    return out


GOLDEN = {  # case -> 'artifact=hash ...' (the student ones per label source)
    "arc_challenge.yaml:plain": (
        "store=bd0dab34fe211418 probe=11193fb01813bcfb baseline=7a4b5524f061ae4b student:gold=cb24f9c8030b6219"),
    "arc_challenge.yaml:fewshot": (
        "store=f0e2f741d2047984 probe=c85907693c960045 baseline=3d93434d1943a465 student:gold=8a74ba91fc4fd9d0"),
    "arc_challenge.yaml:fewshot_from": (
        "store=e85ed72e8f7b07d1 probe=4ed0822d17df00da baseline=d33f54564fe4f9e4 student:gold=3e2f94452f92d554"),
    "arc_challenge.yaml:fewshot_from_unused": (
        "store=65bfe23be625fe84 probe=c190859fe6b1e8b1 baseline=baa2cf110d6899c9 student:gold=2e2c4a3bf449ce3d"),
    "arc_challenge.yaml:prompt_template": (
        "store=feb9708b4f46a93a probe=34f5b1ea577361f0 baseline=764e275b0d2b7803 student:gold=37e8584991c22521"),
    "arc_challenge.yaml:chat": (
        "store=72e52b50c31c1259 probe=fc5c3e69bea9c571 baseline=e10a2b4641eb37cf student:gold=dd9823a415e8b9c4"),
    "arc_challenge.yaml:task": (
        "store=95dd712bb761650e probe=a77e29e28c29222f baseline=0048d0d79597be53 student:gold=e89378560610c61b"),
    "arc_challenge.yaml:task_empty": (
        "store=bd0dab34fe211418 probe=11193fb01813bcfb baseline=7a4b5524f061ae4b student:gold=cb24f9c8030b6219"),
    "arc_challenge.yaml:tokens": (
        "store=bd0dab34fe211418 probe=11193fb01813bcfb baseline=7a4b5524f061ae4b student:gold=9fb134a0c707daf9"),
    "arc_challenge.yaml:bytes": (
        "store=bd0dab34fe211418 probe=11193fb01813bcfb baseline=7a4b5524f061ae4b student:gold=224c82cac000d5ea"),
    "arc_challenge.yaml:letter": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=41e2d289d6204a42 student:gold=3eb730bb0d56d83a"),
    "arc_challenge.yaml:letter_no_formats": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=fcb96872ed1902cf student:gold=3eb730bb0d56d83a"),
    "arc_challenge.yaml:letter_no_baseline": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=ad714663236cb44d student:gold=3eb730bb0d56d83a"),
    "arc_challenge.yaml:student_template": (
        "store=bd0dab34fe211418 probe=11193fb01813bcfb baseline=7a4b5524f061ae4b student:gold=056c525fd650ce17"),
    "arc_challenge.yaml:max_failures": (
        "store=bd0dab34fe211418 probe=11193fb01813bcfb baseline=7a4b5524f061ae4b student:gold=cb24f9c8030b6219"),
    "arc_challenge.yaml:workers": (
        "store=bd0dab34fe211418 probe=11193fb01813bcfb baseline=7a4b5524f061ae4b student:gold=cb24f9c8030b6219"),
    "arc_challenge.yaml:fraction": (
        "store=bd0dab34fe211418 probe=9184b42f694a614a baseline=7a4b5524f061ae4b student:gold=9aaebab6d96609f2"),
    "arc_challenge.yaml:pool": (
        "store=bd0dab34fe211418 probe=dd79ed306398ad8d baseline=7a4b5524f061ae4b student:gold=75efa4ec4dc09130 "
        "student:probe_pseudo=d8be651cb98f05c2"),
    "arc_challenge.yaml:seed": (
        "store=bd0dab34fe211418 probe=b470874c432c4150 baseline=fc774be90aaa8e12 student:gold=1a8a272b1c8842b6"),
    "arc_challenge.yaml:runtime": (
        "store=bd0dab34fe211418 probe=11193fb01813bcfb baseline=2dd04ed269714490 student:gold=cb24f9c8030b6219"),
    "arc_challenge.yaml:splits": (
        "store=0eec4cd4b250eae0 probe=cf35219e0804e3cf baseline=0e1caee711a455e6 student:gold=27525c2bd37aea49"),
    "arc_challenge.yaml:head": (
        "store=bd0dab34fe211418 probe=11193fb01813bcfb baseline=7a4b5524f061ae4b student:gold=333c74ce0c0d6d90"),
    "arc_challenge.yaml:bf16": (
        "store=062429fae24b6c64 probe=07c9bea16888d9f3 baseline=13d3b27be85ae7f2 student:gold=a33e26f01f1b4718"),
    "arc_challenge.yaml:gpu_auto": (
        "store=062429fae24b6c64 probe=07c9bea16888d9f3 baseline=13d3b27be85ae7f2 student:gold=a33e26f01f1b4718"),
    "arc_challenge.yaml:baseline_fields": (
        "store=bd0dab34fe211418 probe=11193fb01813bcfb baseline=f3ef61fb1460eb8f student:gold=cb24f9c8030b6219"),
    "arc_challenge.yaml:limit": (
        "store=956031c769b80cad probe=a0b78aadee139de2 baseline=f862b1d8c9768699 student:gold=fabe38aa71102d0f"),
    "arc_challenge.yaml:probe_fields": (
        "store=bd0dab34fe211418 probe=7dc30a31007741dc baseline=7a4b5524f061ae4b student:gold=a5059eafc79ca5cb"),
    "arc_challenge.yaml:student_fields": (
        "store=bd0dab34fe211418 probe=11193fb01813bcfb baseline=7a4b5524f061ae4b student:gold=e28bc31f8bc2103d"),
    "arc_challenge.yaml:teacher_misc": (
        "store=42fbed2f70d22e7e probe=74e22eca6b3caf18 baseline=be0d8131e67866e1 student:gold=b9ef488fea599bd4"),
    "arc_challenge_letter.yaml:plain": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=41e2d289d6204a42 student:gold=3eb730bb0d56d83a"),
    "arc_challenge_letter.yaml:fewshot": (
        "store=5a8bccf35b69e9c9 probe=1dea39cb6c81a47c baseline=b8f09cc6efa91bc6 student:gold=90407a7b76051e79"),
    "arc_challenge_letter.yaml:fewshot_from": (
        "store=16b2734a500291bd probe=d205075ccd9bb613 baseline=2d9f46bae7b1d289 student:gold=b82dff99138077f3"),
    "arc_challenge_letter.yaml:fewshot_from_unused": (
        "store=b35e4cb0db9d7a50 probe=a69eb938bae35421 baseline=56f4083c23d9caea student:gold=90695fc071050d0c"),
    "arc_challenge_letter.yaml:prompt_template": (
        "store=71cf9831dd73d3ad probe=b8f6cec29bbaaad3 baseline=731e33e4402b32cd student:gold=d38f9fcf3b0dd8d9"),
    "arc_challenge_letter.yaml:chat": (
        "store=45b7298adbd662a7 probe=8cc8a92ff7a26267 baseline=58ba0a22ae1b8a11 student:gold=b1faef479a18bc5c"),
    "arc_challenge_letter.yaml:task": (
        "store=b2eb5c93dfea6eb5 probe=729c4717dedaf755 baseline=9479d50232a168b3 student:gold=3cd8c25dbb357e97"),
    "arc_challenge_letter.yaml:task_empty": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=41e2d289d6204a42 student:gold=3eb730bb0d56d83a"),
    "arc_challenge_letter.yaml:letter": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=41e2d289d6204a42 student:gold=3eb730bb0d56d83a"),
    "arc_challenge_letter.yaml:letter_no_formats": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=fcb96872ed1902cf student:gold=3eb730bb0d56d83a"),
    "arc_challenge_letter.yaml:letter_no_baseline": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=ad714663236cb44d student:gold=3eb730bb0d56d83a"),
    "arc_challenge_letter.yaml:student_template": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=41e2d289d6204a42 student:gold=8ba9f7d98de77f03"),
    "arc_challenge_letter.yaml:max_failures": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=41e2d289d6204a42 student:gold=3eb730bb0d56d83a"),
    "arc_challenge_letter.yaml:workers": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=41e2d289d6204a42 student:gold=3eb730bb0d56d83a"),
    "arc_challenge_letter.yaml:fraction": (
        "store=cdb34cd515006c7a probe=1cf1566fc57ed0c7 baseline=7f8f665574b04970 student:gold=3df1d475084c8224"),
    "arc_challenge_letter.yaml:pool": (
        "store=cdb34cd515006c7a probe=a0eff45e5076b496 baseline=3dfae9dc85d48158 student:gold=5ef730df5c0b7b5b "
        "student:probe_pseudo=49cf16dc05ddc6ad"),
    "arc_challenge_letter.yaml:seed": (
        "store=cdb34cd515006c7a probe=f9903a07102c1395 baseline=2bb5ebc9f6e800f7 student:gold=5babae6ab015630c"),
    "arc_challenge_letter.yaml:runtime": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=f408bc68fbee2b6d student:gold=3eb730bb0d56d83a"),
    "arc_challenge_letter.yaml:splits": (
        "store=dc54d8415608795a probe=42649594ea1404b3 baseline=ca03b7b75b1893d2 student:gold=24b8be54e938d7f6"),
    "arc_challenge_letter.yaml:head": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=41e2d289d6204a42 student:gold=a6431a25a64acef5"),
    "arc_challenge_letter.yaml:bf16": (
        "store=5ba18e7a958562f1 probe=83d0bc6e94be5687 baseline=1878fc386f054321 student:gold=1275906969cb93ce"),
    "arc_challenge_letter.yaml:gpu_auto": (
        "store=5ba18e7a958562f1 probe=83d0bc6e94be5687 baseline=1878fc386f054321 student:gold=1275906969cb93ce"),
    "arc_challenge_letter.yaml:baseline_fields": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=1cf44f6b829f6877 student:gold=3eb730bb0d56d83a"),
    "arc_challenge_letter.yaml:limit": (
        "store=a9099f8ddac5b2a3 probe=86a3a86bb09601c4 baseline=4522ea3cffb9ce5c student:gold=665cf7c88c259cb2"),
    "arc_challenge_letter.yaml:probe_fields": (
        "store=cdb34cd515006c7a probe=93e4cdb479cea497 baseline=41fe6c3f43a98360 student:gold=75dc3a2637cea2f9"),
    "arc_challenge_letter.yaml:student_fields": (
        "store=cdb34cd515006c7a probe=89d9951d7cac01f3 baseline=41e2d289d6204a42 student:gold=61c9b8725e47d292"),
    "arc_challenge_letter.yaml:teacher_misc": (
        "store=2619a4d19374d1da probe=30ab9c5ad5b80a18 baseline=0e9a7ce3f1410e0d student:gold=64411e2c5db8267c"),
    "arc_easy_full.yaml:plain": (
        "store=e21e9cf1199d813b probe=8127c5cf7c0ef544 baseline=93d3cdad137c50f2 student:gold=e31baebfb18274df "
        "student:logit=2cf4abbfb3c80ce0 student:probe=d4ba15b537e9f45c"),
    "arc_easy_full.yaml:fewshot": (
        "store=cdfa43dce14414de probe=75b890954de40100 baseline=1c9b573b8f9a3362 student:gold=f98ee13f23fcd08c "
        "student:logit=fb94f62d91dce5ee student:probe=264e5dd694eb4e55"),
    "arc_easy_full.yaml:fewshot_from": (
        "store=5eb40330bfc4ba47 probe=f715d6948d5f8a21 baseline=4ae7be4fb24f159f student:gold=802fef8e98091131 "
        "student:logit=212d0703947cc66b student:probe=816e6db47b689f32"),
    "arc_easy_full.yaml:fewshot_from_unused": (
        "store=24773989b0d7bd95 probe=34261649895efa24 baseline=bad12c55b5554b44 student:gold=5d8e554ed7de383e "
        "student:logit=0f4e196f00c3778b student:probe=fd85bc0be354e015"),
    "arc_easy_full.yaml:prompt_template": (
        "store=328444daf410d1a5 probe=5e71bcbab6415528 baseline=7637fa290044f1f0 student:gold=a0aa4bc495e14fb3 "
        "student:logit=2c97cb747ee2bf80 student:probe=5159fa4ad98ffbd0"),
    "arc_easy_full.yaml:chat": (
        "store=e6150d46310c6637 probe=c6a725787253e3bd baseline=a02cdf8b5cd3a565 student:gold=9812619c6d4fa75d "
        "student:logit=13e1f7df08239989 student:probe=ddc94b8468c938c8"),
    "arc_easy_full.yaml:task": (
        "store=5df30e64d9e4804f probe=545f60228419de0c baseline=3ff6061b58ce40a7 student:gold=fe910d6f71d185ab "
        "student:logit=873eb68cf50cfb14 student:probe=a7628be3a4207e7e"),
    "arc_easy_full.yaml:task_empty": (
        "store=e21e9cf1199d813b probe=8127c5cf7c0ef544 baseline=93d3cdad137c50f2 student:gold=e31baebfb18274df "
        "student:logit=2cf4abbfb3c80ce0 student:probe=d4ba15b537e9f45c"),
    "arc_easy_full.yaml:tokens": (
        "store=e21e9cf1199d813b probe=8127c5cf7c0ef544 baseline=93d3cdad137c50f2 student:gold=2c87f4f43585325a "
        "student:logit=10cff0cf3c87a121 student:probe=a8b0d4d1f42a556f"),
    "arc_easy_full.yaml:bytes": (
        "store=e21e9cf1199d813b probe=8127c5cf7c0ef544 baseline=93d3cdad137c50f2 student:gold=d42761f0414d7eb8 "
        "student:logit=de4e0a7c497ce5d2 student:probe=a5a96c4833ffb6c0"),
    "arc_easy_full.yaml:letter": (
        "store=a44dc753893d9e88 probe=a472d13978deba45 baseline=b737fcaf548e3b4e student:gold=6fb9ac6bc1724977 "
        "student:logit=a9af84e8b6ee0fb7 student:probe=3653519d7495a43f"),
    "arc_easy_full.yaml:letter_no_formats": (
        "store=a44dc753893d9e88 probe=a472d13978deba45 baseline=b737fcaf548e3b4e student:gold=6fb9ac6bc1724977 "
        "student:logit=a9af84e8b6ee0fb7 student:probe=3653519d7495a43f"),
    "arc_easy_full.yaml:letter_no_baseline": (
        "store=a44dc753893d9e88 probe=a472d13978deba45 baseline=e9c68180481b0a0b student:gold=6fb9ac6bc1724977 "
        "student:logit=a9af84e8b6ee0fb7 student:probe=3653519d7495a43f"),
    "arc_easy_full.yaml:student_template": (
        "store=e21e9cf1199d813b probe=8127c5cf7c0ef544 baseline=93d3cdad137c50f2 student:gold=818aa587b9b9b32b "
        "student:logit=345bf8d83f1c1c83 student:probe=a3f43695327e5ed2"),
    "arc_easy_full.yaml:max_failures": (
        "store=e21e9cf1199d813b probe=8127c5cf7c0ef544 baseline=93d3cdad137c50f2 student:gold=e31baebfb18274df "
        "student:logit=2cf4abbfb3c80ce0 student:probe=d4ba15b537e9f45c"),
    "arc_easy_full.yaml:workers": (
        "store=e21e9cf1199d813b probe=8127c5cf7c0ef544 baseline=93d3cdad137c50f2 student:gold=e31baebfb18274df "
        "student:logit=2cf4abbfb3c80ce0 student:probe=d4ba15b537e9f45c"),
    "arc_easy_full.yaml:fraction": (
        "store=e21e9cf1199d813b probe=8542f310c02098c2 baseline=93d3cdad137c50f2 student:gold=cb66dfce81cec69b "
        "student:logit=05c7c579ff5cd267 student:probe=86e083f17d80c31a"),
    "arc_easy_full.yaml:pool": (
        "store=e21e9cf1199d813b probe=da77ae274b7b273c baseline=93d3cdad137c50f2 student:gold=5ee3852ced9481ad "
        "student:probe_pseudo=1e8f62a270981925"),
    "arc_easy_full.yaml:seed": (
        "store=e21e9cf1199d813b probe=096e908aa242ee13 baseline=f94d8e553605b71b student:gold=77a851af4439b83e "
        "student:logit=dab9c488173bc04f student:probe=0558eea5cc52f41d"),
    "arc_easy_full.yaml:runtime": (
        "store=e21e9cf1199d813b probe=8127c5cf7c0ef544 baseline=07311ad40acb12fa student:gold=e31baebfb18274df "
        "student:logit=2cf4abbfb3c80ce0 student:probe=d4ba15b537e9f45c"),
    "arc_easy_full.yaml:splits": (
        "store=1b0a8241b188a82e probe=97c3481aeed5d550 baseline=e8022a8b476f90a9 student:gold=58ccd5470485f5b7 "
        "student:logit=af3a9c1024a1d8c2 student:probe=6ef7340fff6f9ab2"),
    "arc_easy_full.yaml:head": (
        "store=e21e9cf1199d813b probe=8127c5cf7c0ef544 baseline=93d3cdad137c50f2 student:gold=ce05168ccb649351 "
        "student:logit=4b3d5703d19f142a student:probe=46564a7faa452c08"),
    "arc_easy_full.yaml:bf16": (
        "store=06ef23aa1127f3bb probe=10a66ad7b4ff8b7e baseline=4efa6c1f7115f8ac student:gold=0a761c20dbd99198 "
        "student:logit=0d4ea903693753db student:probe=1ef7f3f9670eb202"),
    "arc_easy_full.yaml:gpu_auto": (
        "store=06ef23aa1127f3bb probe=10a66ad7b4ff8b7e baseline=4efa6c1f7115f8ac student:gold=0a761c20dbd99198 "
        "student:logit=0d4ea903693753db student:probe=1ef7f3f9670eb202"),
    "arc_easy_full.yaml:baseline_fields": (
        "store=e21e9cf1199d813b probe=8127c5cf7c0ef544 baseline=d58415546e6b64d0 student:gold=e31baebfb18274df "
        "student:logit=2cf4abbfb3c80ce0 student:probe=d4ba15b537e9f45c"),
    "arc_easy_full.yaml:limit": (
        "store=a49f1f6a469a27a7 probe=48e9d8ae5d1d0e40 baseline=7e1faa57f6d3126e student:gold=04983fddbc736000 "
        "student:logit=353abafe9635b40f student:probe=607b71b50c62f63f"),
    "arc_easy_full.yaml:probe_fields": (
        "store=e21e9cf1199d813b probe=d82572eb52fa18a1 baseline=93d3cdad137c50f2 student:gold=f5a3bf5513379100 "
        "student:logit=144186f9dc6d4b20 student:probe=9a60b8a592413b6d"),
    "arc_easy_full.yaml:student_fields": (
        "store=e21e9cf1199d813b probe=8127c5cf7c0ef544 baseline=93d3cdad137c50f2 student:gold=e7cd7b4d174c5e43 "
        "student:logit=353a924f49e2f353 student:probe=42c25f9cf7cc619d"),
    "arc_easy_full.yaml:teacher_misc": (
        "store=a1690d8db1524f97 probe=a85706c281932e2f baseline=a356fd4fc4e14ae0 student:gold=93f2f0ede8bdd33e "
        "student:logit=70be2c4f8614ba5d student:probe=9a40503674effbc5"),
    "arc_easy_letter.yaml:plain": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=34541bc1ba9a776c student:gold=a3d99fcf600994a3"),
    "arc_easy_letter.yaml:fewshot": (
        "store=a88ac750a8022bba probe=5a391661353306a1 baseline=b44727f9815d5dcb student:gold=628d4f04d3ad3511"),
    "arc_easy_letter.yaml:fewshot_from": (
        "store=f28185dca328318e probe=bf7d645f91e9a1f8 baseline=e5cb334f90122e91 student:gold=2d387e2b95e65a00"),
    "arc_easy_letter.yaml:fewshot_from_unused": (
        "store=d20cbff3565b974d probe=363b34d2cf043440 baseline=fdbcda91d7d8be44 student:gold=22ac618daf9e43d0"),
    "arc_easy_letter.yaml:prompt_template": (
        "store=4bca3953d3ba3290 probe=f608d68401fe00f8 baseline=b120102220dba4b5 student:gold=78fde99b52420ef4"),
    "arc_easy_letter.yaml:chat": (
        "store=7aa884a246bb1ed4 probe=f89985f9dd4888fd baseline=e2e8f722a975b855 student:gold=7c445137ab72a8ae"),
    "arc_easy_letter.yaml:task": (
        "store=a03d3e06067d850a probe=e3c618c91efc8c39 baseline=bc7e5637b8bc9b08 student:gold=cdf5923c3901e7b2"),
    "arc_easy_letter.yaml:task_empty": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=34541bc1ba9a776c student:gold=a3d99fcf600994a3"),
    "arc_easy_letter.yaml:letter": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=34541bc1ba9a776c student:gold=a3d99fcf600994a3"),
    "arc_easy_letter.yaml:letter_no_formats": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=b12a767f3386e2f5 student:gold=a3d99fcf600994a3"),
    "arc_easy_letter.yaml:letter_no_baseline": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=6c757fae96f9a757 student:gold=a3d99fcf600994a3"),
    "arc_easy_letter.yaml:student_template": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=34541bc1ba9a776c student:gold=e3cc8109b384369f"),
    "arc_easy_letter.yaml:max_failures": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=34541bc1ba9a776c student:gold=a3d99fcf600994a3"),
    "arc_easy_letter.yaml:workers": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=34541bc1ba9a776c student:gold=a3d99fcf600994a3"),
    "arc_easy_letter.yaml:fraction": (
        "store=b1d2e6a0d75c632d probe=6a4e443ca1bc5e77 baseline=3ce742a1d0d20eab student:gold=7631669db003e2b5"),
    "arc_easy_letter.yaml:pool": (
        "store=b1d2e6a0d75c632d probe=f76dd25bf63bf382 baseline=d90078a2116d55c6 student:gold=67f7b625ef53350d "
        "student:probe_pseudo=1924aa7cf5a89010"),
    "arc_easy_letter.yaml:seed": (
        "store=b1d2e6a0d75c632d probe=4de98d691908b6c4 baseline=480c7a5573b75f76 student:gold=f7cee5b00d97c044"),
    "arc_easy_letter.yaml:runtime": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=a3c1ecbfe714c4e9 student:gold=a3d99fcf600994a3"),
    "arc_easy_letter.yaml:splits": (
        "store=4d02aa97ec5da282 probe=d6f9f8d47b74e4f7 baseline=70627cd466dc3606 student:gold=1e25f4d32f015073"),
    "arc_easy_letter.yaml:head": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=34541bc1ba9a776c student:gold=d4606ebfbbf386b6"),
    "arc_easy_letter.yaml:bf16": (
        "store=a6a05c43ffed424d probe=49623d982cf70ddd baseline=458c56b8d0810bbb student:gold=d1ebda976ea7a0c7"),
    "arc_easy_letter.yaml:gpu_auto": (
        "store=a6a05c43ffed424d probe=49623d982cf70ddd baseline=458c56b8d0810bbb student:gold=d1ebda976ea7a0c7"),
    "arc_easy_letter.yaml:baseline_fields": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=9d111282cfb2131d student:gold=a3d99fcf600994a3"),
    "arc_easy_letter.yaml:limit": (
        "store=b6c9448982bd4181 probe=646c06896d97806c baseline=3c0ae3d3b1e0d452 student:gold=33c5fee1b8b6438d"),
    "arc_easy_letter.yaml:probe_fields": (
        "store=b1d2e6a0d75c632d probe=c867792db394ffb8 baseline=e0a8d097766a283c student:gold=3dd56078fdd32bd5"),
    "arc_easy_letter.yaml:student_fields": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=34541bc1ba9a776c student:gold=6cd0b2362512aaf2"),
    "arc_easy_letter.yaml:teacher_misc": (
        "store=9ca2ed659d1b680f probe=07c41f6a0acd8ba5 baseline=c46320a5e8b889dd student:gold=d04061ab23f201a1"),
    "bench.yaml:plain": (
        "store=912b232d07c7b6db probe=9a49bc389d171a34 baseline=398c2b393f8dbd0b student:gold=6b24b8ee3c2122cb "
        "student:logit=9d229bac9f400100 student:probe=8c1e0781a850a8c2"),
    "bench.yaml:fewshot": (
        "store=6bbc082846959061 probe=49b7e86ee39bd5ba baseline=ed7b3e1d62b30c05 student:gold=89db6b7341a2e209 "
        "student:logit=95d19da0e213584f student:probe=74063cd01bf28840"),
    "bench.yaml:fewshot_from": (
        "store=5d776928b4ac123c probe=4fdfaa9eec778bda baseline=97a574f7f1004f54 student:gold=9eaee0f198fc13bf "
        "student:logit=43b9c4bd9c5e5d8b student:probe=0313911bccdc7c9a"),
    "bench.yaml:fewshot_from_unused": (
        "store=3409f9470d48dcb0 probe=8700733dac268ef4 baseline=38725a96c3cf0621 student:gold=0a1fcb16a54582b8 "
        "student:logit=637ec4dd6c9c9530 student:probe=8a20a389df58c628"),
    "bench.yaml:prompt_template": (
        "store=5b648f384070edc6 probe=6c8b518eed567f99 baseline=499d9d506d9ec05a student:gold=ba7118f53ccb735f "
        "student:logit=e3a73d0b8ac40894 student:probe=fd75a2b0ec727daf"),
    "bench.yaml:chat": (
        "store=c633020d21520a2a probe=54cb844da4126866 baseline=d3f372c384d10843 student:gold=05467ecf300d40f0 "
        "student:logit=54113b0b434c43e8 student:probe=b2ced63d128fc469"),
    "bench.yaml:task": (
        "store=736355564d3113b4 probe=08583e35c496fcb5 baseline=97ebfca29fe024a2 student:gold=24d398cedb9b3e5e "
        "student:logit=d2fff5198a3ad8c4 student:probe=e3a726493e9d76a1"),
    "bench.yaml:task_empty": (
        "store=912b232d07c7b6db probe=9a49bc389d171a34 baseline=398c2b393f8dbd0b student:gold=6b24b8ee3c2122cb "
        "student:logit=9d229bac9f400100 student:probe=8c1e0781a850a8c2"),
    "bench.yaml:tokens": (
        "store=912b232d07c7b6db probe=9a49bc389d171a34 baseline=398c2b393f8dbd0b student:gold=b68f0771d4894a26 "
        "student:logit=52ba7fceac6e8e81 student:probe=7666e34e83418463"),
    "bench.yaml:bytes": (
        "store=912b232d07c7b6db probe=9a49bc389d171a34 baseline=398c2b393f8dbd0b student:gold=77f1c82e32084871 "
        "student:logit=c254f10a393cb73a student:probe=bb6f17037e1c90de"),
    "bench.yaml:letter": (
        "store=70f7d4e705948b7a probe=d0d92fcfae3e52d2 baseline=e09844eb0392cafc student:gold=3aef7efa03f2b2dc "
        "student:logit=7ad27328a443f533 student:probe=0e96f549b64a38de"),
    "bench.yaml:letter_no_formats": (
        "store=70f7d4e705948b7a probe=d0d92fcfae3e52d2 baseline=24888dd302198252 student:gold=3aef7efa03f2b2dc "
        "student:logit=7ad27328a443f533 student:probe=0e96f549b64a38de"),
    "bench.yaml:letter_no_baseline": (
        "store=70f7d4e705948b7a probe=d0d92fcfae3e52d2 baseline=e09844eb0392cafc student:gold=3aef7efa03f2b2dc "
        "student:logit=7ad27328a443f533 student:probe=0e96f549b64a38de"),
    "bench.yaml:student_template": (
        "store=912b232d07c7b6db probe=9a49bc389d171a34 baseline=398c2b393f8dbd0b student:gold=f705365b7eb9435b "
        "student:logit=64565e571bdb1e4d student:probe=9812c40f62ff1c27"),
    "bench.yaml:max_failures": (
        "store=912b232d07c7b6db probe=9a49bc389d171a34 baseline=398c2b393f8dbd0b student:gold=6b24b8ee3c2122cb "
        "student:logit=9d229bac9f400100 student:probe=8c1e0781a850a8c2"),
    "bench.yaml:workers": (
        "store=912b232d07c7b6db probe=9a49bc389d171a34 baseline=398c2b393f8dbd0b student:gold=6b24b8ee3c2122cb "
        "student:logit=9d229bac9f400100 student:probe=8c1e0781a850a8c2"),
    "bench.yaml:fraction": (
        "store=912b232d07c7b6db probe=8ba6bc869410610e baseline=398c2b393f8dbd0b student:gold=798a0e795254b804 "
        "student:logit=cf88d86e3fa4d641 student:probe=95f9ce17f56b35e5"),
    "bench.yaml:pool": (
        "store=912b232d07c7b6db probe=4a452fa83bb87d48 baseline=398c2b393f8dbd0b student:gold=34ef6699bffec222 "
        "student:probe_pseudo=788af4a7db27fa01"),
    "bench.yaml:seed": (
        "store=912b232d07c7b6db probe=5943380a73e04acf baseline=378340f782873197 student:gold=dc76f4e2d5902ce4 "
        "student:logit=68835ce1e90d37cb student:probe=1e892a524650958e"),
    "bench.yaml:runtime": (
        "store=912b232d07c7b6db probe=9a49bc389d171a34 baseline=8c6bd41589ee226d student:gold=6b24b8ee3c2122cb "
        "student:logit=9d229bac9f400100 student:probe=8c1e0781a850a8c2"),
    "bench.yaml:splits": (
        "store=ea9b62d2e43832c1 probe=05cc0875d7268331 baseline=d7de9c60923c8c60 student:gold=9c020837415299a8 "
        "student:logit=e1143bca6b050284 student:probe=5e2f04a54b694d5a"),
    "bench.yaml:head": (
        "store=912b232d07c7b6db probe=9a49bc389d171a34 baseline=398c2b393f8dbd0b student:gold=9dc98de2a8e88227 "
        "student:logit=fd414963822fd613 student:probe=c7d2f9c7cd691276"),
    "bench.yaml:bf16": (
        "store=53207d63820ac9a0 probe=8916e0dcd52b9fa0 baseline=9a840aaaec412595 student:gold=dbffba0a7567e81d "
        "student:logit=9db52062821ad444 student:probe=9c1dff4dce215f67"),
    "bench.yaml:gpu_auto": (
        "store=53207d63820ac9a0 probe=8916e0dcd52b9fa0 baseline=9a840aaaec412595 student:gold=dbffba0a7567e81d "
        "student:logit=9db52062821ad444 student:probe=9c1dff4dce215f67"),
    "bench.yaml:baseline_fields": (
        "store=912b232d07c7b6db probe=9a49bc389d171a34 baseline=0bfd186d0d62bd90 student:gold=6b24b8ee3c2122cb "
        "student:logit=9d229bac9f400100 student:probe=8c1e0781a850a8c2"),
    "bench.yaml:limit": (
        "store=ec8b0649a61bda30 probe=45fb7f40f977f652 baseline=1979a89d7d6b7bbe student:gold=b74afecff9512e86 "
        "student:logit=6e9e93ecb3900d71 student:probe=3186da4393303866"),
    "bench.yaml:probe_fields": (
        "store=912b232d07c7b6db probe=538257fd7bf60715 baseline=398c2b393f8dbd0b student:gold=8a4f6fe041f83439 "
        "student:logit=bccdfd521bad5dec student:probe=7ad4c9a9b641b62b"),
    "bench.yaml:student_fields": (
        "store=912b232d07c7b6db probe=9a49bc389d171a34 baseline=398c2b393f8dbd0b student:gold=dd11e9c376d171ab "
        "student:logit=787060d49bf745fa student:probe=98ece73fbacdb699"),
    "bench.yaml:teacher_misc": (
        "store=dab59663a78d3f90 probe=7beafdaa6039b0fa baseline=1eab621a6c2b3b1c student:gold=d912b87e79484a18 "
        "student:logit=ad7ed4b44922519a student:probe=b06e549d4ba66a51"),
    "default.yaml:plain": (
        "store=8e5f26ab08af5313 probe=4dc435914487cad0 baseline=fb5b395eeba8645f student:gold=6ffa58c4f62de35f "
        "student:logit=dc33747ad26f91eb student:probe=ab62913e1bec0093"),
    "default.yaml:fewshot": (
        "store=de768f0657b5137c probe=ef036663fed4446c baseline=264a9f33e7c8807c student:gold=cc0b8517e2401ee4 "
        "student:logit=30800a739afd5621 student:probe=ba99e09a1851d5cd"),
    "default.yaml:fewshot_from": (
        "store=5f5e17a8e96da0b4 probe=e2b6ea3a4bf0efaf baseline=a5364869f0a519c8 student:gold=a67c5ea76c3691af "
        "student:logit=2720b5d0601d8f4b student:probe=b0cebdccccb8f712"),
    "default.yaml:fewshot_from_unused": (
        "store=cba8040d52a228ae probe=03e8f3ad5be23c1e baseline=67622d9d70b4fbaa student:gold=a292a1f7901c2042 "
        "student:logit=4bc7ca048dea52ba student:probe=eaae5a5adac23fca"),
    "default.yaml:prompt_template": (
        "store=166714d5a47154e6 probe=789f992bcd8e66d3 baseline=ad7bd084ddf72ba6 student:gold=ea760dee75cf7904 "
        "student:logit=cef5afb41111392a student:probe=120b462315dbf5f3"),
    "default.yaml:chat": (
        "store=2f4fc2ad2e432dd1 probe=07bec06e771f83b7 baseline=f4d809f92bf82cbb student:gold=e0129d5e324315a0 "
        "student:logit=61c9d44739ba3814 student:probe=8e4922bf7ea1b0d3"),
    "default.yaml:task": (
        "store=330a4d749fe98bb8 probe=ebb24ed785183956 baseline=5dc5de9a2b57af2c student:gold=e74d59db9d8e6c68 "
        "student:logit=6d70c8055d7b58af student:probe=5bb10e32eda729a1"),
    "default.yaml:task_empty": (
        "store=8e5f26ab08af5313 probe=4dc435914487cad0 baseline=fb5b395eeba8645f student:gold=6ffa58c4f62de35f "
        "student:logit=dc33747ad26f91eb student:probe=ab62913e1bec0093"),
    "default.yaml:tokens": (
        "store=8e5f26ab08af5313 probe=4dc435914487cad0 baseline=fb5b395eeba8645f student:gold=10d25c1e72abcad2 "
        "student:logit=b9f6603ce8b4fb2c student:probe=f5fe15132e2606be"),
    "default.yaml:bytes": (
        "store=8e5f26ab08af5313 probe=4dc435914487cad0 baseline=fb5b395eeba8645f student:gold=793dc3cba9e28df4 "
        "student:logit=df99b4668fe5d8c8 student:probe=b6add077cc47b633"),
    "default.yaml:letter": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=5fa97ac5897e00e4 student:gold=3d9c0caacb22c490 "
        "student:logit=7bdff8832a509589 student:probe=372c93aab01a2867"),
    "default.yaml:letter_no_formats": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=5fa97ac5897e00e4 student:gold=3d9c0caacb22c490 "
        "student:logit=7bdff8832a509589 student:probe=372c93aab01a2867"),
    "default.yaml:letter_no_baseline": (
        "store=b1d2e6a0d75c632d probe=0e817f3c1218e3ea baseline=118aabcad4fdfed2 student:gold=3d9c0caacb22c490 "
        "student:logit=7bdff8832a509589 student:probe=372c93aab01a2867"),
    "default.yaml:student_template": (
        "store=8e5f26ab08af5313 probe=4dc435914487cad0 baseline=fb5b395eeba8645f student:gold=24d9ecd07eb825a2 "
        "student:logit=e3208bc3f14947d5 student:probe=dfc0584758399253"),
    "default.yaml:max_failures": (
        "store=8e5f26ab08af5313 probe=4dc435914487cad0 baseline=fb5b395eeba8645f student:gold=6ffa58c4f62de35f "
        "student:logit=dc33747ad26f91eb student:probe=ab62913e1bec0093"),
    "default.yaml:workers": (
        "store=8e5f26ab08af5313 probe=4dc435914487cad0 baseline=fb5b395eeba8645f student:gold=6ffa58c4f62de35f "
        "student:logit=dc33747ad26f91eb student:probe=ab62913e1bec0093"),
    "default.yaml:fraction": (
        "store=8e5f26ab08af5313 probe=2687a2df0ed4cf24 baseline=fb5b395eeba8645f student:gold=f3cef16140a40bc6 "
        "student:logit=cfe4c2195ef31614 student:probe=9d9f26dd2cb256bc"),
    "default.yaml:pool": (
        "store=8e5f26ab08af5313 probe=adbae2df77df3764 baseline=fb5b395eeba8645f student:gold=587c6090d6d7197a "
        "student:probe_pseudo=14e841e911f44cf9"),
    "default.yaml:seed": (
        "store=8e5f26ab08af5313 probe=828773274e0cc4f2 baseline=74eec3641bddcd71 student:gold=3afbe19e13676e76 "
        "student:logit=6e38eac4d66227ce student:probe=00f2642b565ab2a0"),
    "default.yaml:runtime": (
        "store=8e5f26ab08af5313 probe=4dc435914487cad0 baseline=4f29173ffb90100d student:gold=6ffa58c4f62de35f "
        "student:logit=dc33747ad26f91eb student:probe=ab62913e1bec0093"),
    "default.yaml:splits": (
        "store=a4b11b415b9519ef probe=b869c5940c075ce8 baseline=c152d2fe1472d5d4 student:gold=28006c5a6fef2a3b "
        "student:logit=e5198b64b8e8be87 student:probe=014b196d1ce69720"),
    "default.yaml:head": (
        "store=8e5f26ab08af5313 probe=4dc435914487cad0 baseline=fb5b395eeba8645f student:gold=c0a6a403366e794d "
        "student:logit=2aca32b24e3c3f11 student:probe=01611d56f1637f79"),
    "default.yaml:bf16": (
        "store=873c60c6633f8cce probe=74397bf1bb8ee521 baseline=7fc4c706ee03f612 student:gold=f1ffeddde43e3b40 "
        "student:logit=ef0b90177b9533b9 student:probe=3a2f6159c6dfba3b"),
    "default.yaml:gpu_auto": (
        "store=873c60c6633f8cce probe=74397bf1bb8ee521 baseline=7fc4c706ee03f612 student:gold=f1ffeddde43e3b40 "
        "student:logit=ef0b90177b9533b9 student:probe=3a2f6159c6dfba3b"),
    "default.yaml:baseline_fields": (
        "store=8e5f26ab08af5313 probe=4dc435914487cad0 baseline=eca00ea0c70b16b3 student:gold=6ffa58c4f62de35f "
        "student:logit=dc33747ad26f91eb student:probe=ab62913e1bec0093"),
    "default.yaml:limit": (
        "store=e04b023f8a5e7e33 probe=7102c3da8a79c622 baseline=5b46dc5b965d5587 student:gold=67b298d546905a98 "
        "student:logit=f800de0d2acc71a9 student:probe=46dc6365f2d40da0"),
    "default.yaml:probe_fields": (
        "store=8e5f26ab08af5313 probe=0d56487ba41f9148 baseline=fb5b395eeba8645f student:gold=db28fd62b6fe7c3b "
        "student:logit=66621e8dbd93610d student:probe=824f43b2fc2ed922"),
    "default.yaml:student_fields": (
        "store=8e5f26ab08af5313 probe=4dc435914487cad0 baseline=fb5b395eeba8645f student:gold=45b041d9a7f55283 "
        "student:logit=1392a7f6b809ff9e student:probe=6a5b7c8944fa8fe0"),
    "default.yaml:teacher_misc": (
        "store=2c7ce09f15f94374 probe=2ceebd7a063605e1 baseline=9ef9015a0ef74ceb student:gold=3a685050cd009226 "
        "student:logit=6f49b4d4335eb837 student:probe=1f77e980d62c0b11"),
    "tiny.yaml:plain": (
        "store=953233b9a48259ff probe=af64bcf21cf70259 baseline=c37521ed2cf4f01f student:gold=e2ee166cf0743a99 "
        "student:logit=c04a6f64326e07e3 student:probe=5aa9de25f917c8c0"),
    "tiny.yaml:fewshot": (
        "store=050b88dc4a289345 probe=29c6de822a5bc88f baseline=8c38fa43b452ed59 student:gold=51167d15d6241312 "
        "student:logit=326935e456e8fda2 student:probe=84e960ee6f6b6d20"),
    "tiny.yaml:fewshot_from": (
        "store=6772439f7f966d37 probe=f792dffef4d267b0 baseline=8aace10e02a7b25d student:gold=7ab3f69ff28237ef "
        "student:logit=36d3674597fd681b student:probe=2c87ed85e39b888d"),
    "tiny.yaml:fewshot_from_unused": (
        "store=7ded282f0f20911b probe=3eb714f841dbdd20 baseline=d8660ae24bdc9961 student:gold=dd21c5998c205a2d "
        "student:logit=fc82bf6dc7ae024c student:probe=05756d0d3b21fb7f"),
    "tiny.yaml:prompt_template": (
        "store=2d672eb3632ed922 probe=cafb366442e37950 baseline=7b881cdf087080b0 student:gold=b6de9aa800f17df0 "
        "student:logit=d1383c91a0cbc61b student:probe=d47d4e1401927bf5"),
    "tiny.yaml:chat": (
        "store=be090cb33ec0d36c probe=0a52f70e2a0b145f baseline=a5e409942f0fc523 student:gold=25d23b031392e801 "
        "student:logit=3aaa64db1bce6231 student:probe=34290f2002ad9355"),
    "tiny.yaml:task": (
        "store=f3c7a6896948e5a2 probe=13e28539a5488d6f baseline=10a5c85afbaaf351 student:gold=b579caf5fed6f2f3 "
        "student:logit=af54d73d1142bb45 student:probe=c2386c397c205351"),
    "tiny.yaml:task_empty": (
        "store=953233b9a48259ff probe=af64bcf21cf70259 baseline=c37521ed2cf4f01f student:gold=e2ee166cf0743a99 "
        "student:logit=c04a6f64326e07e3 student:probe=5aa9de25f917c8c0"),
    "tiny.yaml:tokens": (
        "store=953233b9a48259ff probe=af64bcf21cf70259 baseline=c37521ed2cf4f01f student:gold=9fa1fe63ddaba381 "
        "student:logit=31868826c2f09c96 student:probe=6730a29761874d8c"),
    "tiny.yaml:bytes": (
        "store=953233b9a48259ff probe=af64bcf21cf70259 baseline=c37521ed2cf4f01f student:gold=bc35c22bcb9a9a93 "
        "student:logit=71425dd380476689 student:probe=fdf09db16eed94f4"),
    "tiny.yaml:letter": (
        "store=8c248aad0b145e75 probe=52dd4decdf4c6267 baseline=c5540862c8343104 student:gold=f29398968644e44f "
        "student:logit=a19e816e89a950a4 student:probe=f0d19ccc2d3b8ad1"),
    "tiny.yaml:letter_no_formats": (
        "store=8c248aad0b145e75 probe=52dd4decdf4c6267 baseline=9273f35a3be802e4 student:gold=f29398968644e44f "
        "student:logit=a19e816e89a950a4 student:probe=f0d19ccc2d3b8ad1"),
    "tiny.yaml:letter_no_baseline": (
        "store=8c248aad0b145e75 probe=52dd4decdf4c6267 baseline=aadedb4a0762bfd4 student:gold=f29398968644e44f "
        "student:logit=a19e816e89a950a4 student:probe=f0d19ccc2d3b8ad1"),
    "tiny.yaml:student_template": (
        "store=953233b9a48259ff probe=af64bcf21cf70259 baseline=c37521ed2cf4f01f student:gold=54b8787098660f67 "
        "student:logit=a3dcdf475e9d79e6 student:probe=f3f0c2438239cf86"),
    "tiny.yaml:max_failures": (
        "store=953233b9a48259ff probe=af64bcf21cf70259 baseline=c37521ed2cf4f01f student:gold=e2ee166cf0743a99 "
        "student:logit=c04a6f64326e07e3 student:probe=5aa9de25f917c8c0"),
    "tiny.yaml:workers": (
        "store=953233b9a48259ff probe=af64bcf21cf70259 baseline=c37521ed2cf4f01f student:gold=e2ee166cf0743a99 "
        "student:logit=c04a6f64326e07e3 student:probe=5aa9de25f917c8c0"),
    "tiny.yaml:fraction": (
        "store=953233b9a48259ff probe=d845314caa139bf6 baseline=c37521ed2cf4f01f student:gold=11985dd398f6e1d4 "
        "student:logit=d9a0339bedded23e student:probe=b7459e1a9f65affc"),
    "tiny.yaml:pool": (
        "store=953233b9a48259ff probe=2fa5037e33070b99 baseline=c37521ed2cf4f01f student:gold=77a375d3e9122c22 "
        "student:probe_pseudo=725ed527b1f19fba"),
    "tiny.yaml:seed": (
        "store=953233b9a48259ff probe=abbd59ac6df74131 baseline=1ff6a37c4172fbab student:gold=e1287564e0c20966 "
        "student:logit=7cb74de57306aaa7 student:probe=c885cda5e0b4f0db"),
    "tiny.yaml:runtime": (
        "store=953233b9a48259ff probe=af64bcf21cf70259 baseline=f7aae43f963b0a1c student:gold=e2ee166cf0743a99 "
        "student:logit=c04a6f64326e07e3 student:probe=5aa9de25f917c8c0"),
    "tiny.yaml:splits": (
        "store=bf06e7c592bc5962 probe=f72b02b7401607de baseline=5633b542e0f915e0 student:gold=3ad5435ac688edd5 "
        "student:logit=3adc936bc0c59f71 student:probe=1b3bb5a7683202f8"),
    "tiny.yaml:head": (
        "store=953233b9a48259ff probe=af64bcf21cf70259 baseline=c37521ed2cf4f01f student:gold=898e34597060dcd8 "
        "student:logit=ca16e0f01e893448 student:probe=1294e2989d5030b1"),
    "tiny.yaml:bf16": (
        "store=2c541f4a0ad580f5 probe=933fc2b8e19b9cb6 baseline=75f4c026b59ae8a6 student:gold=1cae41f18e22a4bc "
        "student:logit=29b87d8e6144d706 student:probe=e0bfbc010dd063b2"),
    "tiny.yaml:gpu_auto": (
        "store=2c541f4a0ad580f5 probe=933fc2b8e19b9cb6 baseline=75f4c026b59ae8a6 student:gold=1cae41f18e22a4bc "
        "student:logit=29b87d8e6144d706 student:probe=e0bfbc010dd063b2"),
    "tiny.yaml:baseline_fields": (
        "store=953233b9a48259ff probe=af64bcf21cf70259 baseline=aca99c49cb49db36 student:gold=e2ee166cf0743a99 "
        "student:logit=c04a6f64326e07e3 student:probe=5aa9de25f917c8c0"),
    "tiny.yaml:limit": (
        "store=96fc31c5d7e94d98 probe=ad8ab3b116e881e4 baseline=58974f39a185d8b3 student:gold=7e1753fef8be71d9 "
        "student:logit=0a77aa580a158994 student:probe=aaf2f48d493f4899"),
    "tiny.yaml:probe_fields": (
        "store=953233b9a48259ff probe=85d91a0e7ed59886 baseline=c37521ed2cf4f01f student:gold=3ba700f07809ed5e "
        "student:logit=2a068e17a0b6886f student:probe=9f5003c2e503ec70"),
    "tiny.yaml:student_fields": (
        "store=953233b9a48259ff probe=af64bcf21cf70259 baseline=c37521ed2cf4f01f student:gold=96f0697375fc9951 "
        "student:logit=1c77c2ac7d1cce6d student:probe=b05c998cdac775ac"),
    "tiny.yaml:teacher_misc": (
        "store=806e437ba116d3a8 probe=05a3b002f013fa30 baseline=7b9977ae52409a96 student:gold=e8609f4bdee27107 "
        "student:logit=cd6ff7addcfed2c6 student:probe=e9214d9f21dfe876"),
    "bench:arc_easy": (
        "store=912b232d07c7b6db probe=9a49bc389d171a34 baseline=398c2b393f8dbd0b student:gold=6b24b8ee3c2122cb "
        "student:logit=9d229bac9f400100 student:probe=8c1e0781a850a8c2"),
    "bench:arc_easy:cell": (
        "store=912b232d07c7b6db probe=ae2bba86ff580b79 baseline=4310845fc8012723 student:gold=e00e1b4cba13fa9d "
        "student:gold+logit=3381b07fc0d02267 student:gold+probe=b36768b2f0b44d70 student:logit=87adcea7800181ef "
        "student:logit_pseudo=935a8bb832dddc47 student:probe=1489c1d963f6c78c student:probe_pseudo=edd412ab13e6a5ab"),
    "bench:arc_easy:slice": (
        "store=912b232d07c7b6db probe=5fb4260aa351f4f2 baseline=6eaf6a487e5705ba student:gold=6661b0db997553b6 "
        "student:probe=5a0b2a5350bcfe03"),
    "bench:arc_challenge": (
        "store=e6821c6322c44fe2 probe=8888cc3fc85d871b baseline=d0f6c82a3828b781 student:gold=85a733b3e2f78c89 "
        "student:logit=5998a647487d7c56 student:probe=6098fbcfe0eda1db"),
    "bench:arc_challenge:cell": (
        "store=e6821c6322c44fe2 probe=054f6da8504ed139 baseline=8f4b5b1f5a2704b8 student:gold=629d178acee02bd4 "
        "student:gold+logit=a7d5f7ce94b3b04f student:gold+probe=2f9d4bee866749de student:logit=d4ba039d4cb1dfe9 "
        "student:logit_pseudo=94b65d28a6e3b08e student:probe=3a3c3a2e23d6676d student:probe_pseudo=d17d52c61a7a7e53"),
    "bench:arc_challenge:slice": (
        "store=e6821c6322c44fe2 probe=4c69a6fc5b727aae baseline=77fcc0f8ef061219 student:gold=1ae38dda10880741 "
        "student:probe=2a8e72a6ad246d16"),
    "bench:mmlu": (
        "store=15c8dfcf5eb684fd probe=c1c8fd8515a3cd21 baseline=041986370dd540d7 student:gold=086badd0982696e2 "
        "student:logit=7ff1abdd52f8ffe6 student:probe=d8a809fcc82fafde"),
    "bench:mmlu:cell": (
        "store=15c8dfcf5eb684fd probe=79fda145bd2db79f baseline=28f24b81829a8e02 student:gold=2498ccfdb9d3bd71 "
        "student:gold+logit=8fad05a1e02bd67e student:gold+probe=3237e5ab025dfafb student:logit=b1d6214f29310229 "
        "student:logit_pseudo=f565a505d921b2b9 student:probe=d9bfcd912a44cf60 student:probe_pseudo=795125b3b189bd75"),
    "bench:mmlu:slice": (
        "store=15c8dfcf5eb684fd probe=4c9b0e7b9155aeb9 baseline=3ea367dd095fdc58 student:gold=fa8a5e9e839fd881 "
        "student:probe=89b0c923f578ea20"),
    "bench:aqua_rat": (
        "store=0b520d45078dee4b probe=8f4c0df4a7b88b38 baseline=9f684af7849a5351 student:gold=e90a090703b82833 "
        "student:logit=71df1cb7933c2412 student:probe=07bb47a7ea23b500"),
    "bench:aqua_rat:cell": (
        "store=0b520d45078dee4b probe=af8a0354ddb5a6d0 baseline=ba1abcd69ab93f05 student:gold=988cb8c4a6a41aac "
        "student:gold+logit=af408c0ecbb7f40b student:gold+probe=b181a4e226ec0f34 student:logit=aa2e728e6096d8f5 "
        "student:logit_pseudo=4ffc4e1d28f40ced student:probe=12c1bcd4ff0b7b0f student:probe_pseudo=9143459929ab7a18"),
    "bench:aqua_rat:slice": (
        "store=0b520d45078dee4b probe=7a74ff61688e1786 baseline=e4e0c7b74026e1ae student:gold=287a248ee036f8b0 "
        "student:probe=841e4d1e5ae1821b"),
}



def test_the_golden_identities_are_unchanged():
    now = {name: identity_hashes(cfg) for name, cfg in cases().items()}
    assert sorted(now) == sorted(GOLDEN)
    for name, frozen in GOLDEN.items():
        assert now[name] == dict(tok.split("=") for tok in frozen.split()), name


def test_the_stages_name_and_check_their_artifacts_by_these_identities():
    from cluster.pipeline import baseline_dir, probe_dir, student_dir

    cfg = load(REPO / "configs" / "default.yaml", ["teacher.dtype=float32", "prompt.normalise=bytes"])
    frozen = dict(tok.split("=") for tok in GOLDEN["default.yaml:bytes"].split())
    assert config_hash(store_identity(cfg)) == frozen["store"]
    assert probe_dir(cfg).name == f"probes-{frozen['probe'][:8]}"
    assert baseline_dir(cfg).name == f"baseline-{frozen['baseline'][:8]}"
    assert student_dir(cfg, "logit").name == f"logit-{frozen['student:logit'][:8]}"


def _identities(cfg) -> dict[str, str]:
    return {a: config_hash(identity(cfg, a, "logit" if a == "student" else None)) for a in ARTIFACTS}


BASE = ["teacher.dtype=float32"]


@pytest.mark.parametrize("override", ["student.max_failures=5", "student.num_workers=2", "student.cpus_per_worker=7",
                                      "student.use_gpu=true", "ray.num_cpus=3", "ray.address=auto", "out_dir=elsewhere",
                                      "extract.replicas=4", "extract.batch_size=3", "teacher.cache_dir=/x",
                                      "student.label_sources=[gold]", "bench.seeds=[9]"])
def test_a_runtime_field_leaves_every_identity_unchanged(override):
    assert _identities(load(REPO / "configs/default.yaml", [*BASE, override])) == \
        _identities(load(REPO / "configs/default.yaml", BASE))


@pytest.mark.parametrize("override", ["extract.chunk_rows=64", "data.max_train=10", "prompt.pool=mean",
                                      "prompt.fewshot=1", "teacher.dtype=bfloat16", "data.split_seed=2"])
def test_a_store_field_changes_every_identity(override):
    before, after = (_identities(load(REPO / "configs/default.yaml", [*BASE, *o])) for o in ([], [override]))
    assert all(before[a] != after[a] for a in ARTIFACTS)


@pytest.mark.parametrize("override", ["probe.folds=3", "probe.cs=[0.1]", "data.train_fraction=0.5"])
def test_a_probe_field_changes_the_probe_and_student_only(override):
    before, after = (_identities(load(REPO / "configs/default.yaml", [*BASE, *o])) for o in ([], [override]))
    assert {a for a in ARTIFACTS if before[a] != after[a]} == {"probe", "student"}


@pytest.mark.parametrize("override", ["student.lr=0.001", "student.template='{{ question }}'", "prompt.normalise=bytes"])
def test_a_student_field_changes_the_student_only(override):
    before, after = (_identities(load(REPO / "configs/default.yaml", [*BASE, *o])) for o in ([], [override]))
    assert {a for a in ARTIFACTS if before[a] != after[a]} == {"student"}


def test_in_letter_mode_the_baseline_follows_the_probe():
    letter = [*BASE, "prompt.mode=letter", "probe.families=[logreg]"]
    for formats, follows in ((["baseline.formats=[]"], False), (["baseline.formats=[' {letter}']"], True)):
        before, after = (_identities(load(REPO / "configs/default.yaml", [*letter, *formats, *o]))
                         for o in ([], ["probe.folds=3"]))
        assert (before["baseline"] != after["baseline"]) == follows


def test_every_field_declares_what_it_decides():
    """Walk every leaf field of Config: each carries a declaration, and one that decides nothing says why."""
    from engine.identity import META, SECTION, Decides, Section

    def walk(cls):
        for f in dataclasses.fields(cls):
            if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
                assert isinstance(f.metadata.get(SECTION), Section), f.name
                yield from walk(f.default_factory)
            else:
                yield f

    leaves = list(walk(Config))
    assert len(leaves) == len(field_docs())
    for f in leaves:
        d = f.metadata.get(META)
        assert isinstance(d, Decides) and set(d.artifacts) <= set(ARTIFACTS), f.name
        assert d.artifacts or d.why, f.name


# Toy schemas (module level: the builder reads their type hints)


@dataclass(frozen=True)
class Inner:
    kept: int = field(default=1, metadata=decides("store"))
    forgotten: int = 2


@dataclass(frozen=True)
class Outer:
    seed: int = field(default=0, metadata=decides("probe"))
    inner: Inner = field(default_factory=Inner, metadata=section())


@dataclass(frozen=True)
class Unsaid:
    quiet: int = field(default=0, metadata=decides())
    odd: int = field(default=0, metadata=decides("stor"))
    inner: Inner = field(default_factory=Inner)


@dataclass(frozen=True)
class Part:
    a: int = field(default=1, metadata=decides("store"))
    b: int = field(default=0, metadata=decides("store", omit_default=True))
    c: str = field(default="x", metadata=decides("store", unless="b"))
    d: str = field(default="n", metadata=decides("student", key="part.d", omit_default=True))


@dataclass(frozen=True)
class Flat:
    lo: int = field(default=0, metadata=decides("store", key="flat.range"))
    hi: int = field(default=9, metadata=decides("store", key="flat.range"))
    n: int = field(default=4, metadata=decides("probe", value=lambda cfg: cfg.flat.n * 2))
    workers: int = field(default=1, metadata=runtime("resources"))


@dataclass(frozen=True)
class Toy:
    out: str = field(default="o", metadata=decides_nothing("a folder"))
    part: Part = field(default_factory=Part, metadata=section(nest=True))
    flat: Flat = field(default_factory=Flat, metadata=section())


def test_a_field_without_a_declaration_is_refused():
    with pytest.raises(TypeError, match=r"inner\.forgotten: declares nothing"):
        check_declared(Outer)
    with pytest.raises(TypeError) as err:
        check_declared(Unsaid)
    assert "quiet: decides nothing; say why" in str(err.value) and "odd: decides unknown artifacts" in str(err.value)
    assert "inner: a section" in str(err.value)


def test_the_builder_reads_only_the_metadata():
    """A toy schema through the generic builder: keys, nesting, grouping, omit_default, unless, value."""
    check_declared(Toy)
    toy = Toy()
    assert fields_identity(toy, "store") == {"part": {"a": 1}, "flat.range": [0, 9]}
    assert fields_identity(toy, "baseline") == fields_identity(toy, "store")
    assert fields_identity(toy, "probe") == {"part": {"a": 1}, "flat.range": [0, 9], "flat.n": 8}
    changed = Toy(part=Part(b=2, d="m"), flat=Flat(workers=5))
    assert fields_identity(changed, "student") == {"part": {"a": 1, "b": 2, "c": "x"}, "part.d": "m",
                                                   "flat.range": [0, 9], "flat.n": 8}


def test_deciding_fields_and_the_runtime_fields_of_the_student():
    decide = deciding_fields(StudentConfig, "student")
    assert STUDENT_RUNTIME == ("num_workers", "cpus_per_worker", "use_gpu", "max_failures")
    assert not set(decide) & {*STUDENT_RUNTIME, "label_sources"}
    names = [f.name for f in dataclasses.fields(StudentConfig)]
    assert sorted([*decide, *STUDENT_RUNTIME, "label_sources"]) == sorted(names)
    assert deciding_fields(StudentConfig, "store") == ()
    assert set(identity(load(REPO / "configs/default.yaml", BASE), "student", "gold")["student"]) == set(decide) - {"template"}  # (null)
