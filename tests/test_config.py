"""Options: precedence, EveryDream2 compatibility, early clear errors, and the generated flag table."""
from __future__ import annotations

import pytest

from tests.conftest import REPO, write_json
from utils.options import config
from utils.options.flags import FLAGS


@pytest.fixture
def paths(tmp_path, small_dataset):
    model = tmp_path / "model"
    model.mkdir()
    return {"resume_ckpt": str(model), "data_root": str(small_dataset)}


def load(tmp_path, json_values: dict | None = None, argv: list[str] = ()):
    extra = []
    if json_values is not None:
        extra = ["--config", str(write_json(tmp_path / "train.json", json_values))]
    return config.load(extra + list(argv))


def test_precedence_cli_over_json_over_default(tmp_path, paths):
    args = load(tmp_path, {**paths, "batch_size": 6, "lr": 3e-6, "gradient_checkpointing": True},
                ["--batch_size", "3", "--no-gradient_checkpointing"])
    assert args.batch_size == 3  # CLI wins
    assert args.lr == 3e-6  # JSON wins over the default
    assert args.gradient_checkpointing is False  # the CLI can switch off a JSON true
    assert args.max_epochs == 300  # default
    assert args.sources["batch_size"] == "command line"


def test_plugins_come_as_a_json_list_or_names_on_the_command_line(tmp_path, paths):
    assert load(tmp_path, {**paths, "plugins": ["a.B"]}).plugins == ["a.B"]
    assert load(tmp_path, {**paths, "plugins": ["a.B"]}, ["--plugins", "c.D", "e.F"]).plugins == ["c.D", "e.F"]


def test_json_null_means_default_and_ints_are_numbers(tmp_path, paths):
    args = load(tmp_path, {**paths, "ema_update_interval": None, "ema_device": None, "cond_dropout": 0})
    assert args.ema_update_interval == 500 and args.ema_device == "cpu"
    assert args.cond_dropout == 0.0 and isinstance(args.cond_dropout, float)


def test_everydream2_train_json_is_accepted(tmp_path, paths):
    """Every key of EveryDream2's shipped train.json (values as shipped, paths pointed at real folders)."""
    ed2 = {
        "amp": True, "batch_size": 10, "ckpt_every_n_minutes": None, "clip_grad_norm": None, "clip_skip": 0,
        "cond_dropout": 0.04, "data_root": paths["data_root"], "disable_amp": False,
        "disable_textenc_training": False, "disable_xformers": False, "flip_p": 0.0, "gpuid": 0,
        "gradient_checkpointing": True, "grad_accum": 1, "logdir": "logs", "log_step": 25, "lowvram": False,
        "lr": 1.5e-06, "lr_decay_steps": 0, "lr_scheduler": "constant", "lr_warmup_steps": None, "max_epochs": 30,
        "notebook": False, "optimizer_config": "optimizer.json", "project_name": "project_abc", "resolution": 512,
        "resume_ckpt": paths["resume_ckpt"], "run_name": None, "sample_prompts": "sample_prompts.txt",
        "sample_steps": 300, "save_ckpt_dir": None, "save_ckpts_from_n_epochs": 0, "save_every_n_epochs": 20,
        "save_optimizer": False, "scale_lr": False, "seed": 555, "shuffle_tags": False, "validation_config": None,
        "wandb": False, "write_schedule": False, "rated_dataset": False, "rated_dataset_target_dropout_percent": 50,
        "zero_frequency_noise_ratio": 0.02, "enable_zero_terminal_snr": False, "load_settings_every_epoch": False,
        "min_snr_gamma": None, "ema_decay_rate": None, "ema_strength_target": None, "ema_update_interval": None,
        "ema_device": None, "ema_sample_nonema_model": False, "ema_sample_ema_model": False,
        "ema_resume_model": None, "attn_type": "sdp", "loss_type": "mse_huber", "pyramid_noise_discount": None,
        "embedding_perturbation": 0.0, "timestep_start": 0, "timestep_end": 1000, "train_sampler": "ddpm",
        "keep_tags": 0, "no_save_ckpt": False, "no_prepend_last": False, "plugins": None, "useadam8bit": False,
        "ed1_mode": False,
    }
    args = load(tmp_path, ed2)
    assert args.batch_size == 10 and args.save_every_n_epochs == 20 and args.ckpt_every_n_minutes is None
    assert args.amp is True and args.sample_steps == 300


def test_derived_values(tmp_path, paths):
    args = load(tmp_path, {**paths, "seed": -1})
    assert 0 <= args.seed <= 2**30
    assert args.ckpt_every_n_minutes == 20  # neither save cadence given
    args = load(tmp_path, {**paths, "save_every_n_epochs": 0, "ckpt_every_n_minutes": 5})
    assert args.save_every_n_epochs is None and args.ckpt_every_n_minutes == 5


@pytest.mark.parametrize("values, message", [
    ({"batchsize": 2}, "unknown key 'batchsize'. Did you mean 'batch_size'?"),
    ({"batch_size": "4"}, "key 'batch_size' must be a whole number"),
    ({"lr": "fast"}, "key 'lr' must be a number"),
    ({"gradient_checkpointing": "yes"}, "key 'gradient_checkpointing' must be true or false"),
    ({"batch_size": 0}, "key 'batch_size' is 0; it must be at least 1"),
    ({"cond_dropout": 1.5}, "key 'cond_dropout' is 1.5; it must be at most 1"),
    ({"loss_type": "l1"}, "key 'loss_type' is 'l1'; choose one of: mse, huber, mse_huber, huber_mse"),
    ({"resolution": 500}, "resolution 500 is not a multiple of 64"),
    ({"timestep_start": 600, "timestep_end": 500}, "timestep_start (600) must be below timestep_end (500)"),
    ({"disable_unet_training": True, "disable_textenc_training": True}, "nothing would be trained"),
    ({"attn_type": "xformers"}, "attn_type 'xformers' needs the xformers package, which is not installed"),
    ({"plugins": "my.Plugin"}, "key 'plugins' must be a list of strings"),
    ({"plugins": ["my.Plugin", 3]}, "key 'plugins[1]' must be a string"),
    ({"optimizer_config": "nope.json"}, "optimizer_config 'nope.json' not found"),
])
def test_bad_values_name_the_file_and_key(tmp_path, paths, values, message):
    with pytest.raises(config.ConfigError) as err:
        load(tmp_path, {**paths, **values})
    assert message in str(err.value)
    if message.startswith(("unknown key", "key '")):
        assert str(tmp_path / "train.json") in str(err.value)


def test_data_root_may_be_a_manifest_but_not_a_resolver_object(tmp_path, paths):
    manifest = write_json(tmp_path / "manifest.json", [{"image": "a.png"}])
    assert load(tmp_path, {**paths, "data_root": str(manifest)}).data_root == str(manifest)
    with pytest.raises(config.ConfigError, match="resolver object or list .* is not supported"):
        load(tmp_path, {**paths, "data_root": {"resolver": "directory", "path": paths["data_root"]}})
    with pytest.raises(config.ConfigError, match="neither a folder nor a manifest .json"):
        load(tmp_path, {**paths, "data_root": str(tmp_path / "train.json.txt")})


def test_missing_paths_are_errors(tmp_path, paths):
    with pytest.raises(config.ConfigError, match="data_root '.*nowhere' is neither a folder nor a manifest"):
        load(tmp_path, {**paths, "data_root": str(tmp_path / "nowhere")})
    with pytest.raises(config.ConfigError, match="resume_ckpt '.*missing.safetensors' does not exist"):
        load(tmp_path, {**paths, "resume_ckpt": str(tmp_path / "missing.safetensors")})
    with pytest.raises(config.ConfigError, match="'resume_ckpt' is required"):
        load(tmp_path, {"data_root": paths["data_root"]})
    with pytest.raises(config.ConfigError, match="not valid JSON"):
        (tmp_path / "broken.json").write_text('{"batch_size": 2,}')
        config.load(["--config", str(tmp_path / "broken.json")])


def test_bad_config_exits_nonzero_before_creating_outputs(tmp_path, paths, capsys):
    """train.py exits with main's return value (`sys.exit(main())`, checked on train.py processes in
    tests/e2e/test_resume.py), so main is called in this process: a new process spends ~10 s importing torch and
    diffusers before it reads the file."""
    import train

    logdir = tmp_path / "logs"
    cfg = write_json(tmp_path / "train.json", {**paths, "logdir": str(logdir), "lr_schedular": "cosine"})
    assert train.main(["--config", str(cfg)]) == 2
    console = capsys.readouterr()
    assert f"{cfg}: unknown key 'lr_schedular'. Did you mean 'lr_scheduler'?" in console.err + console.out
    assert not logdir.exists()


def test_every_flag_has_a_cli_switch_and_a_documented_row():
    parser = config.build_parser()
    options = {opt for action in parser._actions for opt in action.option_strings}
    table = config.flag_table_markdown()
    for flag in FLAGS:
        assert f"--{flag.name}" in options
        assert f"| `{flag.name}` |" in table


def test_flag_doc_is_current():
    """doc/FLAGS.md is generated from the registry; regenerate with `python -m utils.options.config > doc/FLAGS.md`."""
    assert (REPO / "doc" / "FLAGS.md").read_text() == config.flag_table_markdown()
