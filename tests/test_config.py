"""Configuration: presets, flag overrides and one-line errors that write nothing."""
import pytest
import torch
import yaml

from tetsnn.engine.config import DEFAULTS, PRESET_DIR, ConfigError, list_presets, load_config, resolve
from tetsnn.engine.train import main, resolve_run_config

PRESETS = {"digits", "cifar10_resnet19", "cifar100_resnet19", "cifar10dvs_vggsnn", "dvsgesture_vggsnn",
           "imagenet_resnet34", "imagenet_sew_resnet34"}


def test_every_preset_resolves():
    assert PRESETS <= set(list_presets())
    table = {  # the TET recipes' preset table: model, T, batch, optimizer, epochs, lambda
        "digits": ("digits_snn", 4, 64, "adam", 15, 1e-3),
        "cifar10_resnet19": ("resnet19", 4, 128, "adam", 200, 1e-3),
        "cifar100_resnet19": ("resnet19", 4, 128, "adam", 200, 1e-3),
        "cifar10dvs_vggsnn": ("vggsnn", 10, 128, "adam", 150, 1e-4),
        "dvsgesture_vggsnn": ("vggsnn", 16, 32, "adam", 100, 1e-4),
        "imagenet_resnet34": ("resnet34", 6, 256, "sgd", 100, 1e-4),
        "imagenet_sew_resnet34": ("sew_resnet34", 4, 256, "sgd", 100, 1e-4),
    }
    for name, (model, T, bs, opt, epochs, lamb) in table.items():
        cfg = resolve(load_config(name))
        assert (cfg["model"], cfg["T"], cfg["batch_size"], cfg["optimizer"], cfg["epochs"]) == (model, T, bs, opt, epochs)
        assert cfg["lamb"] == pytest.approx(lamb) and cfg["means"] == 1.0
    assert resolve(load_config("cifar100_resnet19"))["num_classes"] == 100
    assert resolve(load_config("dvsgesture_vggsnn"))["num_classes"] == 11
    assert resolve(load_config("imagenet_resnet34"))["lr"] == 0.1


def test_flags_override_keys_with_dashes():
    cfg = resolve_run_config(["--batch-size", "32", "--lr", "1e-2", "--amp", "bf16", "--download", "--T", "2"])
    assert cfg["batch_size"] == 32 and cfg["lr"] == 0.01 and cfg["amp"] == "bf16"
    assert cfg["download"] is True and cfg["T"] == 2 and cfg["dataset"] == "digits"
    assert set(cfg) == set(DEFAULTS)


@pytest.mark.parametrize("argv, words", [
    (["--lr", "abc"], ["lr", "'abc'"]),
    (["--optimizer", "rmsprop"], ["optimizer", "rmsprop"]),
    (["--model", "nope"], ["model", "nope"]),
    (["--batch-size", "0"], ["batch_size"]),
    (["--no-such-flag", "1"], ["--no-such-flag"]),
    (["--config", "missing.yaml"], ["missing.yaml"]),
    (["--sync-bn", "--device", "cpu"], ["sync-bn", "CUDA"]),
    (["--model-kw", "{taux: 1}"], ["model_kw", "taux"]),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], ["device"]),
])
def test_bad_config_is_one_line_error_and_writes_nothing(tmp_path, capsys, argv, words):
    out = tmp_path / "run"
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err
    assert not out.exists()


def test_unknown_key_in_yaml_names_key_and_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.01, "learning_rate": 0.1}))
    assert main(["--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "c.yaml" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="num_classes"):
        resolve({"num_classes": -3})


# the spiking transformers' presets: (model, model preset, dataset, T, epochs, batch, lr, weight decay,
# warmup, mixup, cutmix, mixup off epoch, RandAugment, random erasing), from each paper's official config
TRANSFORMER_PRESETS = {
    "cifar10_spikformer": ("spikformer", "cifar-4-384", "cifar10", 4, 300, 128, 5e-4, 0.06, 20, 0.5, 0.0, 200,
                           "rand-m9-n1-mstd0.4-inc1", 0.25),
    "cifar100_spikformer": ("spikformer", "cifar-4-384", "cifar100", 4, 300, 128, 5e-4, 0.06, 20, 0.5, 0.0, 200,
                            "rand-m9-n1-mstd0.4-inc1", 0.25),
    "cifar10dvs_spikformer": ("spikformer", "dvs-2-256", "cifar10-dvs", 16, 106, 16, 1e-3, 0.06, 10, 0.5, 0.0, 0,
                              None, 0.0),
    "imagenet_spikformer_8_768": ("spikformer", "imagenet-8-768", "imagenet", 4, 300, 192, 5e-4, 0.05, 20, 0.8, 1.0,
                                  0, "rand-m9-mstd0.5-inc1", 0.25),
    "imagenet_spike_driven_8_768": ("spike_driven_transformer", "imagenet-8-768", "imagenet", 4, 300, 288, 1e-3,
                                    0.01, 20, 0.2, 1.0, 0, "rand-m7-mstd0.5-inc1", 0.0),
    "cifar10_qkformer": ("qkformer", "cifar-4-384", "cifar10", 4, 400, 64, 1e-3, 0.06, 20, 0.5, 0.0, 200,
                         "rand-m9-n1-mstd0.4-inc1", 0.25),
    "imagenet_qkformer_10_768": ("qkformer", "imagenet-10-768", "imagenet", 4, 200, 576, 1.35e-3, 0.05, 5, 0.0, 0.0,
                                 0, "rand-m9-mstd0.5-inc1", 0.25),
}
RECIPE_KEYS = ("dataset", "T", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "mixup", "cutmix",
               "mixup_off_epoch", "randaugment", "random_erasing")


@pytest.mark.parametrize("name", sorted(TRANSFORMER_PRESETS))
def test_transformer_presets_follow_their_papers(name):
    """The recipe keys, checked with a registered stand-in model (the preset's own model is checked
    by test_transformer_presets_resolve_with_their_models)."""
    model, preset, *recipe = TRANSFORMER_PRESETS[name]
    raw = load_config(name)
    assert (raw["model"], raw["model_kw"]) == (model, {"preset": preset})
    text = (PRESET_DIR / f"{name}.yaml").read_text()
    assert "paper's accuracy" in text.splitlines()[0]
    cfg = resolve({**raw, "model": "digits_snn", "model_kw": {}, "data_dir": "/nowhere"})
    assert tuple(cfg[k] for k in RECIPE_KEYS) == tuple(recipe)
    assert (cfg["loss"], cfg["optimizer"], cfg["label_smoothing"]) == ("sdt", "adamw", 0.1)
    assert resolve({**raw, "model": "digits_snn", "model_kw": {}, "data_dir": "/nowhere", "loss": "tet"})["loss"] == "tet"


@pytest.mark.parametrize("name", sorted(TRANSFORMER_PRESETS))
@pytest.mark.parametrize("loss", ["sdt", "tet"])
def test_transformer_presets_resolve_with_their_models(name, loss):
    cfg = resolve({**load_config(name), "data_dir": "/nowhere", "loss": loss})
    assert cfg["model"] == TRANSFORMER_PRESETS[name][0] and cfg["loss"] == loss
