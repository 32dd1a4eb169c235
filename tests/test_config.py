"""Config: presets hold the upstream numbers, every field has a CLI flag, bad values fail fast and say which field."""
import json
import re
import subprocess
import sys
from dataclasses import fields

import pytest

from embxlib.config import Config, build_config, coerce, field_help, medium, medium_x01, tiny
from embxlib.model import count_params
from embxlib.train import build_parser, parse
from conftest import PYTHON, ROOT, python_env

V, D, HEAD = 50257, 1024, 50304


def upstream_params(value_tables: int, input_tables: int, scalars: int) -> int:
    """The reference's derivation: embeddings + value embeddings + padded head + 15 attention + 16 MLP layers."""
    return (input_tables + value_tables) * V * D + HEAD * D + 15 * 4 * D * D + 16 * 2 * 4096 * D + scalars


def test_medium_is_record8():
    c = medium()
    assert (c.num_layers, c.model_dim, c.num_heads, c.head_dim, c.no_attn_layers) == (16, 1024, 8, 128, (7,))
    assert c.num_iterations == 5960 and c.train_batch_tokens == 524_288 and c.val_tokens == 10_485_760
    assert c.ve_map() == [0, 1, 2] + [None] * 10 + [0, 1, 2]
    assert c.skip_pairs == [(9, 6), (10, 4), (11, 2)]
    assert count_params(c) == upstream_params(3, 1, 80)


def test_medium_x01_parameter_count():
    c = medium_x01()
    assert c.num_iterations == 5690 and c.extra_embeds == 1 and c.value_embeds == 5
    assert c.ve_map() == [0, 1, 2, 3, 4] + [None] * 6 + [0, 1, 2, 3, 4]
    assert count_params(c) == 608_885_856 == upstream_params(5, 2, 96)


def test_every_field_has_a_flag_and_help():
    ap = build_parser()
    flags = {s for a in ap._actions for s in a.option_strings}
    helps = field_help()
    for f in fields(Config):
        assert "--" + f.name.replace("_", "-") in flags, f.name
        assert helps.get(f.name), f"field {f.name} has no one-line comment"


def test_flags_override_preset(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args, cfg = parse(["--preset", "medium", "--extra-embeds", "3", "--ve-remove", "0,13", "--no-compile", "--dry-run"])
    assert cfg.extra_embeds == 3 and cfg.ve_remove == (0, 13) and cfg.compile is False and cfg.num_layers == 16
    assert cfg.name == "x03-ve3-rm0-13"
    assert Config.from_dict(cfg.to_dict()) == cfg  # JSON round trip


@pytest.mark.parametrize("variant, expected", [
    # seed 004 / reference section 6 (00003 run numbers)
    (dict(ve_remove=(0,)), [None, 1, 2] + [None] * 10 + [0, 1, 2]),  # 0: the table of layer 0 stays on 13
    (dict(ve_remove=(0, 1, 2)), [None] * 13 + [0, 1, 2]),  # 7
    (dict(ve_remove=(0, 13)), [None, 0, 1] + [None] * 11 + [0, 1]),  # 8: a whole table dropped
    (dict(value_embeds=4, ve_layers=(0, 1, 2) + (-1,) * 9 + (0, 1, 2, 3)), [0, 1, 2] + [None] * 9 + [0, 1, 2, 3]),  # 14
    (dict(value_embeds=4), [0, 1, 2, 3] + [None] * 8 + [0, 1, 2, 3]),  # 15
    (dict(value_embeds=8), [0, 1, 2, 3, 4, 5, 6, None, 0, 1, 2, 3, 4, 5, 6, 7]),  # 19: layer 7 has no attention
    (dict(ve_shift=1), [None, 0, 1, 2] + [None] * 9 + [0, 1, 2]),  # 20
    (dict(ve_shift=2), [None, None, 0, 1, 2] + [None] * 8 + [0, 1, 2]),  # 21
    (dict(value_embeds=2, ve_layout="adjacent", ve_span=3), [0, 0, 0] + [None] * 10 + [1, 1, 1]),  # 11
    (dict(value_embeds=2, ve_layout="adjacent", ve_span=2), [0, 0] + [None] * 12 + [1, 1]),  # 12
    (dict(ve_layout="mirrored"), [0, 1, 2] + [None] * 10 + [2, 1, 0]),  # 27
    (dict(value_embeds=5, ve_layout="mirrored"), [0, 1, 2, 3, 4] + [None] * 6 + [4, 3, 2, 1, 0]),  # 28
])
def test_value_embedding_variants(variant, expected):
    c = medium(**variant).validate()
    assert c.ve_map() == expected


@pytest.mark.parametrize("flags, field", [
    (["--extra-embeds", "-1"], "extra_embeds"),
    (["--value-embeds", "4"], "value_embeds"),  # tiny has 6 layers: at most 3 tables on two layers each
    (["--ve-remove", "6"], "ve_remove"),
    (["--token-lambdas", "x03"], "token_lambdas"),
    (["--ve-layout", "diagonal"], "ve_layout='diagonal': allowed: upstream, mirrored, adjacent"),
    (["--preset", "huge"], "preset"),
])
def test_invalid_settings_exit_before_training(flags, field, tmp_path):
    r = subprocess.run([PYTHON, "-m", "embxlib.train", *flags, "--run-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, env=python_env(), timeout=60)
    assert r.returncode == 2
    assert field in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


def test_unknown_flag_is_an_error(tmp_path):
    r = subprocess.run([PYTHON, "-m", "embxlib.train", "--extra-embedz", "2"], capture_output=True, text=True,
                       env=python_env(), timeout=60)
    assert r.returncode == 2 and "--extra-embedz" in r.stderr


def test_world_size_must_fit_the_global_batch():
    with pytest.raises(ValueError, match="train_batch_tokens=524288.*world_size=3"):
        medium().validate(world_size=3)
    assert medium().grad_accum_steps(1) == 8 and medium().grad_accum_steps(8) == 1


def test_dry_run_prints_resolved_config():
    r = subprocess.run([PYTHON, "-m", "embxlib.train", "--preset", "medium_x01", "--dry-run"], capture_output=True,
                       text=True, env=python_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "parameters: 608,885,856" in r.stdout and "tokens per step: 524,288" in r.stdout
    assert '"extra_embeds": 1' in r.stdout


def test_coerce_names_the_parameter():
    assert coerce("extra_embeds", 3) == 3 and coerce("ve_remove", "0,13") == (0, 13) and coerce("compile", "false") is False
    with pytest.raises(ValueError, match="extra_embeds='three'"):
        coerce("extra_embeds", "three")
    with pytest.raises(ValueError, match="unknown config field"):
        coerce("extra_embedz", 1)


def test_tiny_keeps_the_medium_structure():
    c = tiny().validate(1)
    assert c.no_attn_layers and c.skip_pairs and c.value_embeds >= 2
    ve = c.ve_map()
    assert ve[0] is not None and ve[-1] is not None and ve[0] == ve[c.num_layers - c.value_embeds]


@pytest.mark.parametrize("variant, name", [
    (dict(ve_layout="adjacent", ve_span=1, value_embeds=3), "x00-ve3-adjacent1"),  # not the same model as span 3
    (dict(ve_layout="adjacent"), "x00-ve2-adjacent3"),
    (dict(no_attn_layers=(0, 1, 2, 3, 4, 5)), "x00-ve0-noattn0-1-2-3-4-5"),  # no attention: no value embedding either
    (dict(no_attn_layers=(1,)), "x00-ve2-noattn1"),
    (dict(ve_remove=(0, 1, 4, 5)), "x00-ve0"),  # every table dropped: the model of value_embeds=0
    (dict(value_embeds=0), "x00-ve0"),
    (dict(), "x00-ve2"),
])
def test_variant_name_says_what_is_built(variant, name):
    cfg = tiny(**variant).validate(1)
    assert cfg.name == name
    assert (cfg.num_ve_tables == 0) == ("-ve0" in name)


def test_adjacent_layout_needs_a_span():
    with pytest.raises(ValueError, match="ve_span=0: must be >= 1"):
        tiny(ve_layout="adjacent", ve_span=0).validate()


@pytest.mark.parametrize("name", ["a/../../../x", "..", ".hidden", "a\\b", ""])
def test_name_must_be_one_plain_folder(tmp_path, name):
    r = subprocess.run([PYTHON, "-m", "embxlib.train", "--name", name, "--runs-root", str(tmp_path / "runs")],
                       capture_output=True, text=True, env=python_env(), timeout=60, cwd=tmp_path)
    if name == "":  # empty: derived from the variant, as documented
        assert "must be one plain folder name" not in r.stderr
        return
    assert r.returncode == 2 and f"name={name!r}: must be one plain folder name" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1  # one line, not the usage text
    assert list(tmp_path.iterdir()) == []  # nothing made, inside runs-root or outside it


def test_empty_preset_is_an_error_not_tiny(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        parse(["--preset", "", "--dry-run"])
    r = subprocess.run([PYTHON, "-m", "embxlib.train", "--preset", "", "--dry-run"], capture_output=True, text=True,
                       env=python_env(), timeout=60)
    assert r.returncode == 2 and ("preset='': allowed: ['medium', 'medium_r12', 'medium_r13', 'medium_r14', 'medium_r15', "
                                  "'medium_r16', 'medium_r17', 'medium_x01', 'tiny']") in r.stderr


def test_batch_error_says_what_would_fit():
    with pytest.raises(ValueError) as err:
        tiny(train_batch_tokens=1000).validate(1)  # 1000 is no multiple of 512 for any world size
    message = str(err.value)
    assert "[]" not in message
    assert message == ("train_batch_tokens=1000 is not a multiple of world_size=1 x train_seq_len=512; what fits: "
                       "train_batch_tokens a multiple of 512 (e.g. 512, 1024)")
    with pytest.raises(ValueError, match=r"what fits: train_batch_tokens a multiple of 1024 \(e.g. 1024, 2048\) or "
                                         r"train_seq_len in \[256, 384, 768\] or world sizes \[1, 3\]$"):
        tiny(train_batch_tokens=1536).validate(2)
    with pytest.raises(ValueError, match=r"val_tokens=1000 .* what fits: val_tokens a multiple of 1024 \(e.g. 1024\)$"):
        tiny(val_tokens=1000).validate(1)


def test_coerce_accepts_only_real_booleans():
    assert coerce("compile", "True") is True and coerce("compile", False) is False
    for value in ("yes", 1, "1", None):
        with pytest.raises(ValueError, match=r"compile=.*: expected true or false"):
            coerce("compile", value)
    with pytest.raises(ValueError, match="extra_embeds=True: expected int"):
        coerce("extra_embeds", True)


def test_help_shows_defaults_and_choices():
    r = subprocess.run([PYTHON, "-m", "embxlib.train", "--help"], capture_output=True, text=True, env=python_env(),
                       timeout=60)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps lines
    for choice in ("--preset {tiny,medium,medium_x01,medium_r12,medium_r13,medium_r14,medium_r15,medium_r16,medium_r17}",
                   "--ve-layout {upstream,mirrored,adjacent}",
                   "--precision {bf16,fp32}", "--device {auto,cpu,cuda}", "--attention {auto,flex,sdpa}"):
        assert choice in text, choice
    assert ("training steps (default: 200; medium: 5960; medium_x01: 5690; medium_r12: 5640; medium_r13: 5610; "
            "medium_r14: 5590; medium_r15: 5550; medium_r16, medium_r17: 5535)") in text
    assert ("(default: 0; medium_x01, medium_r12, medium_r13, medium_r14, medium_r15, medium_r16, medium_r17: 1)"
            in text) and "(default: upstream)" in text  # extra_embeds, ve_layout
    assert "default: None" not in text and "--config FILE" in text


def test_tuple_flags_take_negative_values_without_equals():
    _, cfg = parse(["--ve-layers", "-1,0,1,-1,0,1", "--extra-embeds", "1"])
    assert cfg.ve_layers == (-1, 0, 1, -1, 0, 1) and cfg.ve_map() == [None, 0, None, None, 0, 1]


def test_a_runs_config_json_reruns_it_and_flags_override_it():
    run = ROOT / "runs" / "cpu-x0" / "extra_embeds1_s0" / "config.json"
    saved = json.loads(run.read_text())
    _, cfg = parse(["--config", str(run)])
    got = cfg.to_dict()  # (fields added since the run was made take their defaults)
    assert {k: got[k] for k in saved} == {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    _, cfg = parse(["--config", str(run), "--seed", "5", "--extra-embeds", "2"])
    assert (cfg.seed, cfg.extra_embeds, cfg.name) == (5, 2, "x02-ve2")  # the derived name follows the fields
    assert cfg.num_iterations == saved["num_iterations"] and cfg.data_dir == saved["data_dir"]


def test_a_yaml_config_file_starts_from_its_preset(tmp_path):
    path = tmp_path / "x02.yaml"
    path.write_text("preset: medium\nextra_embeds: 2\nve_remove: [0, 13]\nadam_eps: 1e-10\nname: mine\n")
    _, cfg = parse(["--config", str(path), "--dry-run"])
    assert cfg == medium(extra_embeds=2, ve_remove=(0, 13), name="mine")


@pytest.mark.parametrize("content, message", [
    ('{"extra_embedz": 1, "seed": 2, "colour": "red"}', r"unknown field\(s\) \['colour', 'extra_embedz'\]"),
    ('{"extra_embeds": "two"}', "extra_embeds='two': expected int"),
    ("[1, 2]", "expected a mapping of Config fields, got list"),
    ('{"seed": ', "not valid JSON")])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        parse(["--config", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(f"config file {re.escape(str(path))}: .*{message}", err), err


def test_resume_takes_no_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(["--resume", str(tmp_path), "--config", str(tmp_path / "c.json")])
    assert "drop ['--config']" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--adam-beta1", "2"], "adam_beta1=2.0: must be in [0, 1)"),
    (["--adam-beta2", "-0.1"], "adam_beta2=-0.1: must be in [0, 1)"),
    (["--adam-eps", "-1"], "adam_eps=-1.0: must be >= 0"),
    (["--embed-lr", "-1"], "embed_lr=-1.0: must be >= 0"),
    (["--embed-lr", "nan"], "embed_lr=nan: must be a finite number"),
    (["--muon-lr", "inf"], "muon_lr=inf: must be a finite number"),
    (["--muon-momentum", "1.5"], "muon_momentum=1.5: must be in [0, 1)"),
    (["--logit-softcap", "0"], "logit_softcap=0.0: must be > 0"),
    (["--seed", "-1"], "seed=-1: must be an integer in 0..9223372036854775807"),
    (["--seed", str(10**20)], "seed=100000000000000000000: must be an integer in 0..9223372036854775807"),
    (["--name", "a" * 300], "(300 bytes): at most 100 bytes"),
    (["--name", "a\nb"], "name='a\\nb': must be one plain folder name"),
    (["--name", "a\x1bb"], "name='a\\x1bb': must be one plain folder name"),
    (["--run-dir", "runs/" + "r" * 300], "has 300 bytes; at most 255"),
], ids=str)
def test_bad_values_are_one_line_before_anything(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        parse(flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_a_config_file_with_nan_is_refused(tmp_path):
    (tmp_path / "c.json").write_text('{"embed_lr": NaN}')
    with pytest.raises(ValueError, match=r"embed_lr=nan: must be a finite number"):
        build_config({}, tmp_path / "c.json").validate()


def test_a_model_whose_parameters_cannot_fit_is_refused_before_its_folder(tmp_path):
    """Issue 33, Low: no upper bound on bigram_vocab_mult: the run allocated 24 PB and failed after making its
    folder. Its parameters alone (10 bytes each with gradients and Adam's moments) are checked against the memory
    it would train in first."""
    r = subprocess.run([sys.executable, "-m", "embxlib.train", "--bigram-embeds", "1", "--bigram-vocab-mult",
                        "100000000", "--run-dir", str(tmp_path / "run")], capture_output=True, text=True,
                       env=python_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "parameters need at least" in r.stderr and "bigram_embed, has 5,030,400,000,000 x 128 " \
        "(bigram_vocab_mult=100000000)" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
